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
     and, for each of FUSIONS, models/references/adapterhub-fusion-<arch>-<preset>/: two seq_bn
     adapters fused with AdapterHub's `add_adapter_fusion(Fuse(...), preset)`, every fusion
     parameter seeded too:
       fusion_a/, fusion_b/                       (model.save_adapter)
       fusion/                                    (model.save_adapter_fusion: adapter_fusion_config.json,
                                                   model_adapter_fusion.safetensors)
       outputs.npz                                (the fused model's logits)
     (what the fusion computes: references/ADAPTERFUSION.md).

With `--check-graft DIR` the record stage instead loads graft's AdapterHub exports found in
DIR/<arch>-<variant>/ and DIR/<arch>-fusion-<preset>/ (written by the tests'
`GRAFT_ADAPTERHUB_EXPORTS` hook, see core/tests/adapter.rs and adapter_fusion.rs) and compares the `adapters` library's outputs with graft's
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
    ("roberta", "seq_bn", "seq_bn", {}),
    ("roberta", "double_seq_bn", "double_seq_bn", {}),
]
# AdapterFusion recordings: (arch, AdapterHub fusion preset). Each fuses two seq_bn adapters
# named FUSION_ADAPTERS; the adapters' values do not depend on the preset, so the two
# recordings of an arch share the same adapters and differ only in the fusion layers.
FUSIONS = [("bert", "dynamic"), ("bert", "static")]
FUSION_ADAPTERS = ("fusion_a", "fusion_b")
# Standard deviation of the seeded fusion-layer values. The adapters' 0.3 makes the fusion's
# query-key scores O(30) and its softmax pick one adapter at most positions (14-32% of the
# weights in (0.01, 0.99)); 0.1 keeps 89-100% of them there, so the recording tests the mixing.
FUSION_SCALE = 0.1
ARCHS = sorted({arch for arch, *_ in VARIANTS} | {arch for arch, _ in FUSIONS})


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
        # save_adapter writes name_or_path into adapter_config.json as "model_name"; the
        # scratch folder's random name would make every recording differ.
        model.config.name_or_path = f"models/fixtures/{arch}-legacy"
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
            loaded = model.load_adapter(str(folder), load_as=name, set_active=True, use_safetensors=True)
            model.set_active_adapters(loaded)
            model.eval()
            got = logits(model, feeds)
            with np.load(folder / "graft_outputs.npz") as z:
                graft = z["logits"]
            diff = float(np.max(np.abs(got - graft)))
            with np.load(REFERENCES / f"adapterhub-{arch}-{variant}" / "outputs.npz") as z:
                recorded = z["logits"]
            print(
                f"{arch}-{variant}: adapters on graft's export vs graft {diff:.3g}; "
                f"vs the recording {float(np.max(np.abs(got - recorded))):.3g}"
            )
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
    for arch, preset in FUSIONS:
        if check_graft is None:
            record_fusion(arch, preset, load, logits)
        elif not check_fusion(arch, preset, check_graft, load, logits):
            failed.append(f"{arch}-fusion-{preset}")
    if failed:
        print("graft's exports differ in:", ", ".join(failed))
        return 1
    return 0


def check_fusion(arch, preset, check_graft, load, logits) -> bool:
    """Load graft's AdapterHub export of the `preset` fusion on `arch` (found in
    check_graft/<arch>-fusion-<preset>/: one folder per adapter and `a,b/` for the fusion) into
    the `adapters` library and compare its logits with graft's; True when they agree (or when
    graft wrote no such export)."""
    import numpy as np
    import adapters
    from adapters.composition import Fuse

    folder = check_graft / f"{arch}-fusion-{preset}"
    if not folder.exists():
        return True
    model, feeds = load(arch)
    adapters.init(model)
    for name in FUSION_ADAPTERS:
        model.load_adapter(str(folder / name), load_as=name, use_safetensors=True)
    fusion_name = ",".join(FUSION_ADAPTERS)
    model.load_adapter_fusion(str(folder / fusion_name), use_safetensors=True)
    model.set_active_adapters(Fuse(*FUSION_ADAPTERS))
    model.eval()
    got = logits(model, feeds)
    with np.load(folder / "graft_outputs.npz") as z:
        graft = z["logits"]
    with np.load(REFERENCES / f"adapterhub-fusion-{arch}-{preset}" / "outputs.npz") as z:
        recorded = z["logits"]
    diff = float(np.max(np.abs(got - graft)))
    print(
        f"{arch}-fusion-{preset}: adapters on graft's export vs graft {diff:.3g}; "
        f"vs the recording {float(np.max(np.abs(got - recorded))):.3g}"
    )
    return diff <= 1e-5


def record_fusion(arch, preset, load, logits) -> None:
    """Record `Fuse(*FUSION_ADAPTERS)` with the `preset` fusion config on `arch` into
    references/adapterhub-fusion-<arch>-<preset>/: one subfolder per adapter
    (`save_adapter`), `fusion/` (`save_adapter_fusion`) and the fused model's logits."""
    import numpy as np
    import torch
    import adapters
    from adapters.composition import Fuse

    model, feeds = load(arch)
    base = logits(model, feeds)
    adapters.init(model)
    for name in FUSION_ADAPTERS:
        model.add_adapter(name, config="seq_bn")
    fuse = Fuse(*FUSION_ADAPTERS)
    model.add_adapter_fusion(fuse, preset)
    fusion_name = ",".join(FUSION_ADAPTERS)
    with torch.no_grad():
        parameters = sorted(model.named_parameters())
        for group, marker in [(name, f".adapters.{name}.") for name in FUSION_ADAPTERS] + [
            ("fusion", f".adapter_fusion_layer.{fusion_name}.")
        ]:
            seed = seeded(arch, "fusion", group) if group != "fusion" else seeded(arch, "fusion", preset)
            generator = torch.Generator().manual_seed(seed)
            touched = 0
            for key, parameter in parameters:
                if marker in key:
                    scale = FUSION_SCALE if group == "fusion" else 0.3
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
                    touched += 1
            assert touched, f"no parameter matches {marker}"
    model.set_active_adapters(fuse)
    model.eval()
    got = logits(model, feeds)
    with torch.no_grad():
        probabilities = model(**feeds, output_adapter_fusion_attentions=True).adapter_fusion_attentions
    # The fusion must not have saturated into picking one adapter, or the recording would not
    # test the softmax: report the range of the attention weights over adapters.
    weights = np.concatenate(
        [np.asarray(p).reshape(-1) for layers in probabilities.values() for per_layer in layers.values() for p in per_layer.values()]
    )
    change = float(np.max(np.abs(got - base)))
    assert change > 1e-3, f"{arch} fusion {preset}: changes nothing ({change})"
    out = REFERENCES / f"adapterhub-fusion-{arch}-{preset}"
    out.mkdir(parents=True, exist_ok=True)
    for name in FUSION_ADAPTERS:
        model.save_adapter(str(out / name), name, with_head=False, use_safetensors=True)
    model.save_adapter_fusion(str(out / "fusion"), fusion_name, use_safetensors=True)
    np.savez(out / "outputs.npz", logits=got)
    print(
        f"recorded {out.name}: |fused - base| = {change:.3g}, "
        f"fusion weights over adapters in [{weights.min():.3g}, {weights.max():.3g}], "
        f"{np.mean((weights > 0.01) & (weights < 0.99)):.0%} of them in (0.01, 0.99)"
    )


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
