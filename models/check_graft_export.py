#!/usr/bin/env python3
"""Loads graft's HF PEFT exports into HF PEFT itself and records what PEFT computes with them.

For each architecture, graft imports the recorded PEFT adapter (`graft apply --from-peft
models/references/peft-<arch>`), exports it again (`graft export --format peft`), and this script
loads that export with `PeftModel.from_pretrained` on the same torch model the fixtures came
from. It writes `models/references/graft-export-<arch>/` = graft's export files + `outputs.npz`
(PEFT's outputs on the fixture inputs). core/tests/peft.rs checks graft's patched graph against
those outputs.

Usage: python models/check_graft_export.py [--graft target/debug/graft]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).parent))
import record_references as R  # noqa: E402
from peft import PeftModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["llama", "gpt2"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graft", default=str(ROOT / "target/debug/graft"))
    ns = ap.parse_args()
    failed: list[str] = []
    for arch in ARCHS:
        out = ROOT / "models/references" / f"graft-export-{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            patched = Path(tmp) / "patched.onnx"
            subprocess.run([ns.graft, "apply", str(ROOT / f"models/fixtures/{arch}-legacy/model.onnx"),
                            "--from-peft", str(ROOT / f"models/references/peft-{arch}"), "-o", str(patched)],
                           check=True, stdout=subprocess.DEVNULL)
            if out.exists():
                shutil.rmtree(out)
            subprocess.run([ns.graft, "export", str(patched), "--format", "peft", "-o", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
        rec = R.base_recording(arch)
        model = PeftModel.from_pretrained(rec.model, str(out))
        model.eval()
        feeds = R.fixture_arrays(arch, "legacy", "inputs")
        outputs = R.run_outputs(rec, model, feeds)
        R.G.write_npz(out / "outputs.npz", outputs)
        with np.load(ROOT / f"models/references/peft-{arch}/outputs.npz") as z:
            original = {k: z[k] for k in z.files}
        difference = R.max_diff(outputs, original)
        print(f"{arch}: PEFT on graft's export vs PEFT on the original adapter: {difference:.3g}")
        if difference != 0.0:
            failed.append(f"{arch}: PEFT computes differently from graft's export ({difference:.3g})")
    for failure in failed:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
