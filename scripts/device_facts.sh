# Sourced by the device_*.sh scripts: the environment they run in and the machine's facts
# (GPU, driver, torch, Triton, commit, command) as the first lines of $OUT/machine.txt.
#   device_facts "command as run"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device_facts() {
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
    triton.__version__)" | tee -a "$OUT/machine.txt"
  echo "commit ${MUSE_GIT_SHA:-unknown}; command: $1" | tee -a "$OUT/machine.txt"
}
