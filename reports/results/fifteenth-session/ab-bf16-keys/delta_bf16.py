"""The delta rule alone, fwd+bwd, as the Hebbian layer calls it: q, k, v bf16 head slices of a
(B, N, H, D) projection, log-decays and beta float32, TF32 on. Median ms of 20."""
import sys, torch, torch.nn.functional as F
from muse.ops.delta_rule import delta_rule_chunked
from muse.measure.timing import time_with_peak
torch.backends.cuda.matmul.allow_tf32 = True
for b, n in ((16, 4096), (1, 65536)):
    h, d = 8, 64
    g = torch.Generator("cuda").manual_seed(0)
    kw = dict(generator=g, device="cuda")
    p = torch.randn(b, n, 3, h, d, **kw).bfloat16()
    q, k, v = p.unbind(2)
    q, k = F.normalize(q.float(), dim=-1).bfloat16(), F.normalize(k.float(), dim=-1).bfloat16()
    ld = -torch.rand(b, n, h, **kw) * 0.1
    beta = torch.rand(b, n, h, **kw)
    leaves = [x.requires_grad_() for x in (q, k, v, ld, beta)]
    up = torch.randn(b, h, n, d, **kw)
    def step():
        for x in leaves:
            x.grad = None
        qh, kh, vh, lh, bh = (t.transpose(1, 2) for t in leaves)
        y, w = delta_rule_chunked(qh[:, 1:], kh[:, 1:], vh[:, 1:], lh[:, 1:], bh[:, 1:], chunk=64, states="triton")
        (y * up[:, 1:]).sum().backward()
    stats, peak = time_with_peak(step, "cuda", 3, 20)
    print(f"{sys.argv[1]} {b}x{h - 1}x{n}x{d} bf16 inputs: {stats.median_s * 1e3:.3f} ms "
          f"fwd+bwd, peak {peak / 2**20:.0f} MiB", flush=True)
