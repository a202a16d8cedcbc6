"""Published HRA (Yuan et al., NeurIPS 2024, Table 4) and DeLoRA (Bini et al., ICLR 2025, Tables 2-3) tables:
they load, agree with the tables they repeat and with the papers' own reading of them, and render beside measured
runs of the registry's methods and of the peft bridge's peft_hra / peft_delora."""

from __future__ import annotations

import dataclasses
import re

import pytest

import results
from results import papers
from tasks.metrics import METRICS

NEW_TABLES = ["delora_table2", "delora_table3", "hra_table4_control", "hra_table4_subject"]
SUBJECT_METRICS = {"dino": 0.70, "clip_i": 0.80, "clip_t": 0.25, "lpips_diversity": 0.75}


def published(name: str) -> dict[str, dict]:
    """method -> {column: published value} of one paper table."""
    return {row["method"]: row["values"] for row in papers.load_paper(name)["rows"]}


def record(method: str, task: str, metrics: dict, hparams: dict | None = None, seed: int = 0,
           subject: str = "dog", trainable: int = 1000) -> dict:
    """A successful schema-1 run record with the paper metrics `metrics` (shifted by the seed)."""
    hparams = dict(hparams or {})
    config = {"method": {"name": method, **hparams}, "task": task, "subject": subject, "seed": seed}
    return {
        "schema": 1,
        "run": {"id": f"{method}-{sorted(hparams.items())}-{task}-{subject}-{seed}", "status": "success",
                "error": None, "config": config, "config_hash": results.config_hash(config), "seed": seed,
                "sweep": "s", "created_at": "2025-01-01T00:00:00", "finished_at": "2025-01-01T00:05:00",
                "wall_seconds": 300.0},
        "task": {"name": task, "dataset": "real", "subject": subject, "model": "sd"},
        "method": {"name": method, "variant": None, "hparams": hparams, "budget": None,
                   "trainable_params": trainable, "stored_params": trainable, "adapter_bytes": 4 * trainable},
        "train": {"steps": 10, "seconds": 1.0, "peak_memory_mb": 10.0},
        "metrics": {k: v + 0.001 * seed for k, v in metrics.items()},
        "metric_info": {k: dataclasses.asdict(METRICS[k]) for k in metrics},
        "baseline": {"metrics": {k: v / 2 for k, v in metrics.items()}},
    }


def runs(method: str, task: str, metrics: dict, hparams: dict | None = None, **kw) -> list[dict]:
    return [record(method, task, metrics, hparams, seed=s, subject=u, **kw) for s in (0, 1) for u in ("dog", "cat")]


@pytest.mark.parametrize("name", NEW_TABLES)
def test_tables_load_with_citation_and_known_columns(name):
    paper = papers.load_paper(name)
    assert name in papers.available()
    assert " et al." in paper["citation"] and paper["table"] and paper["setting"]
    columns = {c["name"] for c in paper["columns"]}
    for row in paper["rows"]:
        assert set(row["values"]) == columns, (name, row["method"])  # every column given, none misspelt
        match = row.get("match")
        assert match is None or match == "baseline" or set(match) <= {"method", "hparams"}
    table = papers.published(paper)
    assert list(table["method"]) == [r["method"] for r in paper["rows"]]
    assert papers.render(paper).startswith(papers.heading(paper))


def test_hra_repeats_the_oft_and_boft_rows_it_cites():
    """HRA Table 4 copies OFT Tables 1-2 and BOFT Table 9 for its baselines: the copies agree number for number."""
    subject, oft1 = published("hra_table4_subject"), published("oft_table1")
    for hra_row, oft_row in {"DreamBooth": "DreamBooth", "LoRA": "LoRA", "COFT b=4": "COFT", "OFT b=4": "OFT"}.items():
        assert {k: subject[hra_row][k] for k in ("DINO", "CLIP-I", "CLIP-T", "LPIPS")} == oft1[oft_row], hra_row
    control, oft2, boft9 = published("hra_table4_control"), published("oft_table2"), published("boft_table9")
    renamed = {"DreamBooth": "SD", "ControlNet": "ControlNet", "T2I-Adapter": "T2I-Adapter", "LoRA": "LoRA",
               "COFT b=4": "COFT", "OFT b=4": "OFT"}
    for hra_row, oft_row in renamed.items():
        assert {k: v for k, v in control[hra_row].items() if k != "params (M)"} == oft2[oft_row], hra_row
    boft = control["BOFT m=4, r=8"]
    assert {k: boft[k] for k in ("S2I mIoU", "S2I mAcc", "S2I aAcc")} == {
        k: boft9["BOFT (20.76M)"][k] for k in ("S2I mIoU", "S2I mAcc", "S2I aAcc")}
    assert boft["L2F error"] == round(boft9["BOFT (20.76M)"]["L2F error"], 2) and boft["params (M)"] == 20.76


def test_hra_rows_read_as_the_paper_reads_them():
    """§4.3: without the regulariser (λ=0) HRA has the highest subject fidelity, strictly orthogonal (λ=∞) the
    highest prompt fidelity and diversity; HRA has the fewest parameters; strict orthogonality hurts control."""
    subject = published("hra_table4_subject")
    hra = {k: v for k, v in subject.items() if k.startswith("HRA")}
    assert max(hra, key=lambda k: hra[k]["DINO"]) == "HRA r=7, λ=0"
    assert max(hra, key=lambda k: hra[k]["CLIP-T"]) == max(hra, key=lambda k: hra[k]["LPIPS"]) == "HRA r=7, λ=∞"
    sizes = [v["params (M)"] for v in subject.values() if v["params (M)"] is not None]
    assert min(sizes) == hra["HRA r=7, λ=0"]["params (M)"]
    control = published("hra_table4_control")
    assert max(control, key=lambda k: control[k]["S2I mIoU"]) == "HRA r=8, λ=0"
    assert max(control.values(), key=lambda v: v["L2F error"] if v["params (M)"] < 10 else 0)["L2F error"] == 11.11


def test_delora_tables_read_as_the_paper_reads_them():
    """§3.2: DeLoRA has the best S2I controllability of the ablation; §3.3 / Table 3: LoRA, DoRA and DeLoRA at r=16
    are comparable (within 0.002) and all beat the lower-rank baselines; real images share OFT Table 1's row."""
    ablation = published("delora_table2")
    assert max(ablation, key=lambda k: ablation[k]["mIoU"]).startswith("DeLoRA")
    table3 = published("delora_table3")
    r16 = [table3[m] for m in ("LoRA r=16", "DoRA r=16", "DeLoRA r=16")]
    assert max(r["DINO"] for r in r16) - min(r["DINO"] for r in r16) <= 0.002
    low = [table3[m] for m in ("OFT n=4", "ETHER+", "LoRA r=4")]
    assert min(r["DINO"] for r in r16) > max(r["DINO"] for r in low)
    real = published("oft_table1")["real images"]
    assert table3["Real Images"] == {"params (M)": None, "DINO": real["DINO"], "CLIP-I": real["CLIP-I"]}


def test_hra_subject_table_beside_measured_runs():
    data = [*runs("peft_hra", "dreambooth", SUBJECT_METRICS, {"r": 8, "apply_GS": False}),
            *runs("peft_hra", "dreambooth", {**SUBJECT_METRICS, "dino": 0.60}, {"r": 8, "apply_GS": True}),
            *runs("lora", "dreambooth", SUBJECT_METRICS, {"rank": 4}, trainable=4096)]
    paper = papers.load_paper("hra_table4_subject")
    table = papers.compare(paper, data).set_index("method")
    assert table.loc["HRA r=7, λ=0", "measured as"] == "peft_hra {apply_GS=False}"
    assert table.loc["HRA r=7, λ=0", "DINO (measured)"].startswith("0.7005 [")
    assert table.loc["HRA r=7, λ=∞", "DINO (measured)"].startswith("0.6005 [")
    assert table.loc["HRA r=7, λ=0", "DINO (paper)"] == 0.670 and table.loc["HRA r=7, λ=0", "n"] == 4
    assert table.loc["HRA r=7, λ=1e-3", "measured as"] == "—"  # peft has no regulariser weight
    assert table.loc["LoRA", "params (M) (measured)"] == "0.004096"
    assert table.loc["OFT b=4", "measured as"] == "—"
    text = papers.render(paper, data)
    assert text.startswith("HRA Table 4 (subject-driven generation)") and "NeurIPS 2024, Table 4" in text
    header = text.splitlines()[2]
    assert re.search(r"DINO \(paper\) *\| *DINO \(measured\) *\|", header) and "LPIPS (measured)" in header


def test_hra_control_table_beside_measured_runs():
    seg = {"mIoU": 30.0, "mAcc": 40.0, "aAcc": 60.0}
    data = [*runs("peft_hra", "seg2img", seg, {"r": 8}, trainable=890),
            *runs("peft_hra", "landmark2img", {"landmark_error": 5.0}, {"r": 8}, trainable=890),
            *runs("boft", "seg2img", seg, {"factors": 4, "block_size": 8})]
    table = papers.compare(papers.load_paper("hra_table4_control"), data)
    rows = table.set_index(["method", "measured as"])
    hra = rows.loc[("HRA r=8, λ=0", "peft_hra {apply_GS=False}")]
    assert hra["S2I mIoU (measured)"].startswith("30 [") and hra["L2F error (measured)"].startswith("5.001 [")
    assert hra["params (M) (measured)"] == "0.00089" and hra["n"] == 8  # seg2img and landmark2img units
    assert rows.loc[("BOFT m=4, r=8", "boft {factors=4}"), "S2I aAcc (measured)"].startswith("60 [")
    assert "C2I IoU (paper)" in table.columns and "C2I IoU (measured)" not in table.columns  # no canny runs


def test_delora_tables_beside_measured_runs():
    data = [*runs("peft_delora", "dreambooth", SUBJECT_METRICS, {"r": 16, "delora_lambda": 15}),
            *runs("lora", "dreambooth", {**SUBJECT_METRICS, "dino": 0.65}, {"rank": 4}),
            *runs("lora", "dreambooth", SUBJECT_METRICS, {"rank": 16})]
    table = papers.compare(papers.load_paper("delora_table3"), data).set_index("method")
    assert table.loc["DeLoRA r=16", "measured as"] == "peft_delora {r=16}"
    assert table.loc["LoRA r=4", "DINO (measured)"].startswith("0.6505 [")
    assert table.loc["LoRA r=16", "DINO (measured)"].startswith("0.7005 [")
    assert table.loc["DoRA r=16", "measured as"] == "—" and table.loc["DeLoRA† r=16", "measured as"] == "—"
    seg = {"mIoU": 26.0, "aAcc": 65.0, "fid": 30.0}
    ablation = papers.compare(papers.load_paper("delora_table2"),
                              [*runs("peft_delora", "seg2img", seg), *runs("lora", "seg2img", seg)])
    ablation = ablation.set_index("method")
    assert ablation.loc["DeLoRA: λ‖W‖/r BΞA", "Acc. (measured)"].startswith("65 [")
    assert ablation.loc["DeLoRA: λ‖W‖/r BΞA", "FID (measured)"].startswith("30 [")
    assert ablation.loc["LoRA [rank-r]: BA", "measured as"] == "lora"
    text = papers.render(papers.load_paper("delora_table3"), runs("boft", "dreambooth", SUBJECT_METRICS))
    assert "No measured runs match this table's methods (dora, lora, oft, peft_delora)." in text
