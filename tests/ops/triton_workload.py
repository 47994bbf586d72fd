"""One list of launches of every Triton kernel of muse, shared by the interpreter's bounds check
and the Hopper compile check: `exercise` runs each launcher at lengths that leave a program's
last tiles past the end, `record_launches` notes what each launch would compile on a GPU,
`compile_for_hopper` compiles one such note to a cubin without a GPU and `describe` says why
one did not."""

from __future__ import annotations

import inspect
import json

LENGTHS = (1, 2, 5, 9, 33, 100, 257)


def exercise(after_each, lengths=LENGTHS) -> None:
    """Run every launcher at each length; after_each(case) follows each group of launches."""
    import torch

    from muse.ops.bk_core.triton import causal_backward_triton, causal_forward_triton
    from muse.ops.complex_scan.triton import complex_decayed_cumsum_triton
    from muse.ops.decayed_scan.triton import decayed_cumsum_triton, linear_scan
    from muse.ops.delta_states.readout import chunk_readout_triton
    from muse.ops.delta_states.solve import chunk_solve_triton
    from muse.ops.delta_states.triton import delta_walk_triton
    from muse.ops.short_conv import triton as short_conv
    from muse.ops.short_conv.triton import short_conv_triton

    for n in lengths:
        torch.manual_seed(n)
        a = torch.complex(torch.randn(2, n, 3), -torch.rand(2, n, 3) - 0.5)
        k = torch.rand(2, max(n - 1, 0), 3) + 0.25
        g = causal_forward_triton(a, k)
        after_each(f"bk_core forward {n}")
        causal_backward_triton(g, k, torch.randn_like(g))
        after_each(f"bk_core backward {n}")
        u, log_decay = torch.randn(2, n, 5), -torch.rand(5)
        decayed_cumsum_triton(u, log_decay)
        linear_scan(u, -torch.rand(2, n), reverse=True)
        linear_scan(u, -torch.rand(2, n, 5))  # a decay per step and channel (phase3 selective)
        linear_scan(u, -torch.rand(2, n, 5), reverse=True)  # and its backward
        after_each(f"decayed scans {n}")
        planar = torch.randn(2, n, 2 * 40, requires_grad=True)
        complex_decayed_cumsum_triton(planar, -torch.rand(40), torch.rand(40)).sum().backward()
        after_each(f"complex scan {n}")
        m = -(-n // 16)  # chunks of 16 tokens; two column blocks of the state
        walk = [torch.randn(2, m, 16, 16) / 4, torch.randn(2, m, 16, 32),
                torch.nn.functional.normalize(torch.randn(2, m, 16, 16), dim=-1).bfloat16(),
                torch.cumsum(-torch.rand(2, m, 16) / 8, dim=-1), torch.randn(2, 16, 32)]
        walk = [x.requires_grad_() for x in walk]
        sum(x.sum() for x in delta_walk_triton(*walk, block_v=16)).backward()
        after_each(f"delta walk {n}")
        # q, k (and the solve's v) in bfloat16, as the Hebbian layer hands them over under
        # autocast
        readout = [torch.randn(2, m, 16, 16).bfloat16(), torch.randn(2, m, 16, 16).bfloat16(),
                   torch.randn(2, m, 16, 32), torch.randn(2, m, 16, 32),
                   torch.cumsum(-torch.rand(2, m, 16), dim=-1)]
        chunk_readout_triton(*(x.requires_grad_() for x in readout)).sum().backward()
        after_each(f"delta readout {n}")
        solve = [torch.nn.functional.normalize(torch.randn(2, m, 16, 32), dim=-1).bfloat16(),
                 torch.randn(2, m, 16, 16).bfloat16(), torch.rand(2, m, 16),
                 torch.cumsum(-torch.rand(2, m, 16), dim=-1)]
        sum(x.sum() for x in chunk_solve_triton(*(x.requires_grad_() for x in solve))).backward()
        after_each(f"delta solve {n}")
        # a bf16 input as under autocast; channels past one column block
        x = torch.randn(2, n, 130).bfloat16().requires_grad_()
        w = torch.randn(130, 1, 4, requires_grad=True)
        short_conv_triton(x, w).sum().backward()
        short_conv.BACKWARD = "split"  # the backward in two launches, kept or not by timing
        short_conv_triton(x, w[..., :3], activation=False).sum().backward()
        short_conv.BACKWARD = "fused"
        after_each(f"short conv {n}")


def _arg_type(value) -> str:
    if hasattr(value, "data_ptr"):
        return "*" + _POINTEE[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton signature type for {type(value).__name__} {value!r}")


_POINTEE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
            "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8",
            "bool": "i1"}


def record_launches() -> list[dict]:
    """Patch the interpreter (TRITON_INTERPRET=1) to note each distinct launch as
    {module, name, signature, constexprs, options}, in the list returned."""
    from triton.runtime import interpreter

    specs: list[dict] = []
    seen: set[str] = set()
    call = interpreter.GridExecutor.__call__

    def record_and_call(self, *args_dev, **kwargs):
        params = inspect.signature(self.fn)
        bound = params.bind(*args_dev, **{k: v for k, v in kwargs.items() if k in self.arg_names})
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for name, value in bound.arguments.items():
            # the JIT makes an int argument equal to 1, or None, a constant of its kernel
            if (name in self.constexprs or value is None
                    or (type(value) is int and value == 1)):
                signature[name], constexprs[name] = "constexpr", value
            else:
                signature[name] = _arg_type(value)
        spec = {"module": self.fn.__module__, "name": self.fn.__name__, "signature": signature,
                "constexprs": constexprs,
                "options": {k: v for k, v in kwargs.items() if k not in self.arg_names}}
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
        return call(self, *args_dev, **kwargs)

    interpreter.GridExecutor.__call__ = record_and_call
    return specs


def compile_for_hopper(spec: dict) -> list[str]:
    """Compile a noted launch (without TRITON_INTERPRET) as for an H100/H200 and return the
    stages it produced ('ttir' … 'cubin')."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    src = ASTSource(fn, spec["signature"], constexprs=spec["constexprs"])
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"] or None)
    return sorted(kernel.asm)


def describe(error: BaseException) -> str:
    """The lines of a compile error that say what went wrong and where: Triton wraps the error
    once per enclosing call, and only the innermost wrapper holds the line and the message."""
    from triton.compiler.errors import CompilationError

    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 50:
        chain.append(cause)
    wrapped = [e for e in chain if isinstance(e, CompilationError)]
    if not wrapped:
        return "\n".join(f"{type(chain[-1]).__name__}: {chain[-1]}".splitlines()[:12])
    lines = str(wrapped[-1]).splitlines()
    carets = [i for i, line in enumerate(lines) if line.strip() == "^"]
    return "\n".join([lines[0], *lines[carets[-1] - 1 if carets else 1:][:12]])
