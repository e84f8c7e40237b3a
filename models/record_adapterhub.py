#!/usr/bin/env python3
"""Record AdapterHub (`adapters` library) reference outputs for graft's adapter tests.

`adapters` 1.3.0 pins transformers ~=4.57, the fixtures use 5.24, so this runs in two
environments:

  1. export (the fixtures' environment, models/requirements.txt): rebuild each fixture's
     torch model with generate.py's builders (as record_references.py does) and save it as a
     Hugging Face checkpoint (config.json + model.safetensors) in a scratch folder.
  2. record (the adapters environment, models/requirements-adapters.txt): load each
     checkpoint, check it reproduces the committed fixture outputs, add an adapter of each
     recorded variant with AdapterHub's own `add_adapter`, give every adapter parameter a seeded
     non-zero value (so that the up projections are not zero and each adapter changes the
     outputs), and write models/references/adapterhub-<arch>-<variant>/:
       adapter_config.json, adapter.safetensors   (model.save_adapter(..., use_safetensors=True))
       outputs.npz                                (the adapted model on fixtures/<arch>-legacy/inputs.npz)

With `--check-graft DIR` the record stage instead loads graft's AdapterHub exports found in
DIR/<arch>-<variant>/ (written by the tests' `GRAFT_ADAPTERHUB_EXPORTS` hook, see
core/tests/adapter.rs) and compares the `adapters` library's outputs with graft's
(`graft_outputs.npz` there).

Usage (from the repository root):
  python models/record_adapterhub.py --adapters-python /path/to/adapters-env/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models" / "fixtures"
REFERENCES = ROOT / "models" / "references"
SEED = 8765
FIXTURE_TOL = 1e-5

# (arch, variant name, AdapterHub config, extra BnConfig overrides)
VARIANTS = [
    ("bert", "seq_bn", "seq_bn", {}),
    ("bert", "double_seq_bn", "double_seq_bn", {}),
    ("bert", "par_bn", "par_bn", {}),
    ("gpt2", "double_seq_bn", "double_seq_bn", {}),
    ("llama", "seq_bn", "seq_bn", {"reduction_factor": 4}),
    ("llama", "par_bn", "par_bn", {}),
]
ARCHS = sorted({arch for arch, *_ in VARIANTS})


def export_stage(out: Path) -> None:
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(ROOT / "models"))
    import generate as G  # noqa: E402

    for arch in ARCHS:
        rec = G.REGISTRY[arch]()
        target = out / arch
        rec.model.save_pretrained(target, safe_serialization=True)
        (target / "inputs.json").write_text(
            json.dumps({t.onnx_name: t.arg for t in rec.inputs}, indent=1)
        )
        print(f"exported {arch} to {target}")


def seeded(*parts) -> int:
    digest = hashlib.sha256(repr((SEED,) + parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def record_stage(checkpoints: Path, check_graft: Path | None) -> int:
    import numpy as np
    import torch
    import transformers
    import adapters

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    def load(arch):
        folder = checkpoints / arch
        config = transformers.AutoConfig.from_pretrained(folder)
        cls = getattr(transformers, config.architectures[0])
        model = cls.from_pretrained(folder).eval()
        names = json.loads((folder / "inputs.json").read_text())
        with np.load(FIXTURES / f"{arch}-legacy" / "inputs.npz") as z:
            feeds = {names[k]: torch.from_numpy(z[k]) for k in z.files}
        return model, feeds

    def logits(model, feeds):
        with torch.no_grad():
            return model(**feeds).logits.numpy()

    failed = []
    for arch, variant, preset, overrides in VARIANTS:
        model, feeds = load(arch)
        with np.load(FIXTURES / f"{arch}-legacy" / "outputs.npz") as z:
            want = z["logits"]
        base = logits(model, feeds)
        diff = float(np.max(np.abs(base - want)))
        if diff > FIXTURE_TOL:
            raise AssertionError(f"{arch}: checkpoint differs from the fixture by {diff:.3g}")
        adapters.init(model)
        name = f"{variant}_{arch}"
        if check_graft is not None:
            folder = check_graft / f"{arch}-{variant}"
            if not folder.exists():
                continue
            loaded = model.load_adapter(str(folder), load_as=name, set_active=True)
            model.set_active_adapters(loaded)
            model.eval()
            got = logits(model, feeds)
            with np.load(folder / "graft_outputs.npz") as z:
                graft = z["logits"]
            diff = float(np.max(np.abs(got - graft)))
            print(f"{arch}-{variant}: adapters vs graft {diff:.3g}")
            if diff > 1e-5:
                failed.append(f"{arch}-{variant}")
            continue
        config = adapters.AdapterConfig.load(preset, **overrides)
        model.add_adapter(name, config=config)
        model.set_active_adapters(name)
        generator = torch.Generator().manual_seed(seeded(arch, variant))
        with torch.no_grad():
            for key, parameter in sorted(model.named_parameters()):
                if f".adapters.{name}." in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        model.eval()
        out = REFERENCES / f"adapterhub-{arch}-{variant}"
        out.mkdir(parents=True, exist_ok=True)
        model.save_adapter(str(out), name, with_head=False, use_safetensors=True)
        got = logits(model, feeds)
        change = float(np.max(np.abs(got - base)))
        assert change > 1e-3, f"{arch}-{variant}: the adapter changes nothing ({change})"
        np.savez(out / "outputs.npz", logits=got)
        print(f"recorded {out.name}: |adapted - base| = {change:.3g}")
    (REFERENCES / "adapterhub-versions.json").write_text(
        json.dumps(
            {
                "adapters": adapters.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "seed": SEED,
            },
            indent=1,
        )
        + "\n"
    )
    if failed:
        print("graft's exports differ in:", ", ".join(failed))
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["all", "export", "record"], default="all")
    ap.add_argument("--checkpoints", type=Path, help="scratch folder of the exported checkpoints")
    ap.add_argument("--adapters-python", default=sys.executable)
    ap.add_argument("--check-graft", type=Path)
    ns = ap.parse_args()
    if ns.stage == "export":
        export_stage(ns.checkpoints)
        return 0
    if ns.stage == "record":
        return record_stage(ns.checkpoints, ns.check_graft)
    with tempfile.TemporaryDirectory() as scratch:
        export_stage(Path(scratch))
        args = [ns.adapters_python, __file__, "--stage", "record", "--checkpoints", scratch]
        if ns.check_graft:
            args += ["--check-graft", str(ns.check_graft)]
        return subprocess.call(args)


if __name__ == "__main__":
    sys.exit(main())
