"""notebooks/quickstart.ipynb runs end to end at a small size and shows what it promises.

The notebook is executed from a temporary copy (nothing is written into notebooks/) with its
``parameters`` cell replaced by a small setting, in a kernel that runs this interpreter, so the
test works from any virtualenv that has the packages of the ``test`` extra.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys
from pathlib import Path

import ipykernel  # noqa: F401  (the test extra installs these; a missing one is a failure, not a skip)
import matplotlib  # noqa: F401
import nbclient
import nbformat
import pytest
import transformers  # noqa: F401
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"

#: Small enough for a 2-core machine (about a minute), large enough that the prompt spills past the
#: device tier into the host store and both budgets leave host tokens to select.
SMALL = {
    "CONTEXT": 512,
    "DEPTH": 0.5,
    "NEW_TOKENS": 6,
    "SINKS": 4,
    "GPU_BUDGET": 96,
    "K_MIN": 16,
    "K_MAX": 128,
    "PPL_CONTEXT": 256,
    "SCORE": 8,
    "PPL_GPU_BUDGET": 32,
    "BUDGETS": [64, 128],
}

#: Appended to the executed copy: reports what the notebook computed, for the assertions below.
REPORT = """
import json as _json
print("REPORT " + _json.dumps({
    "prompt_tokens": n_prompt,
    "hybrid_answer": hybrid_answer,
    "k_per_step": telemetry.k_per_step(),
    "record_layers": sorted({r.layer for r in telemetry.records}),
    "host_tokens_last": summary["host_tokens_last"],
    "full_perplexity": full.perplexity,
    "rows": rows,
    "patched": hybridgen.hf.is_patched(model),
}))
"""


def _parameters_cell(nb):
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def _assigned_names(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names.add(leaf.id)
    return names


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _images(nb) -> list:
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel started with ``sys.executable``: a kernelspec in a private directory, so neither a
    user-wide ``python3`` spec nor PATH can pick another interpreter."""
    spec_dir = tmp_path / "kernels" / "hybridgen-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "hybridgen test kernel",
                "language": "python",
            }
        )
    )
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="hybridgen-test", kernel_spec_manager=specs)


def test_committed_notebook_has_parameters_and_outputs():
    """What readers see on GitHub: one tagged parameters cell, and outputs from a clean run."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = _parameters_cell(nb)
    missing = set(SMALL) - _assigned_names(params.source)
    assert not missing, f"the parameters cell no longer sets {sorted(missing)}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "commit the notebook executed, every cell run"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"the committed notebook shows an error: {errors[0].get('ename')}"
    assert len(_images(nb)) >= 3
    assert any("hybrid answer:" in _stream_text(c) for c in code)


@pytest.mark.slow
@pytest.mark.slow
def test_notebook_runs_small(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = _parameters_cell(nb)
    params.source = "\n".join(f"{name} = {value!r}" for name, value in SMALL.items())
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    work = tmp_path / "run"
    work.mkdir()
    nbformat.write(nb, work / NOTEBOOK.name)  # a copy to run from: notebooks/ stays untouched

    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(work)}}
    )
    # One intra-op thread unless asked otherwise: on a shared 2-core machine, oversubscribed OpenMP
    # threads make single-token decode steps several times slower than one thread does.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    client.execute(env=env)  # raises CellExecutionError with the failing cell's traceback

    texts = [_stream_text(c) for c in nb.cells if c.cell_type == "code"]
    assert any("hybrid answer:" in t for t in texts)
    assert any("full answer:" in t for t in texts)
    assert len(_images(nb)) >= 3, "the K, timing and budget plots each render an image"
    line = next(l for t in texts for l in t.splitlines() if l.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])

    # The prompt was spilled to the host tier and the scheduler ran every decode step in every layer.
    assert report["prompt_tokens"] > SMALL["SINKS"] + SMALL["GPU_BUDGET"]
    assert report["host_tokens_last"] > 0
    assert report["record_layers"] == list(range(30))  # SmolLM2-135M has 30 layers
    ks = report["k_per_step"]
    assert 1 <= len(ks) <= SMALL["NEW_TOKENS"]
    assert all(SMALL["K_MIN"] <= k <= SMALL["K_MAX"] for _, k, _ in ks)  # the host tier holds more than K_MAX
    assert {s for _, _, s in ks} <= {"post_qkt", "pre_qkt"}
    assert report["hybrid_answer"].strip()

    # One row per policy and budget; post_qkt spends what the device window leaves on host tokens.
    rows = report["rows"]
    assert sorted((r["policy"], r["budget"]) for r in rows) == sorted(
        (p, b) for p in ("post_qkt", "streaming") for b in SMALL["BUDGETS"]
    )
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["delta_pct"] == pytest.approx(100 * (r["perplexity"] / report["full_perplexity"] - 1))
        if r["policy"] == "post_qkt":
            assert r["k"] == r["budget"] - SMALL["SINKS"] - SMALL["PPL_GPU_BUDGET"]
    assert not report["patched"]
