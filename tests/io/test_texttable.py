"""Console tables stay within 100 columns: the final eval table of a representative report (every FAR,
no-flip accuracy, same/diff accuracy: 150+ columns in one piece) wraps into blocks that each start
with the set names, the comparison names long run paths above the table, and bench's precision-auto
table fits too."""
from marginface.deploy.autoprecision import choice_lines
from marginface.evaluate.report import compare_reports, format_comparison, format_results_table, format_table
from marginface.io.texttable import MAX_WIDTH, shorten, table, wrap

METRICS = {"accuracy": 0.99683, "accuracy_std": 0.00312, "threshold": 0.2851, "threshold_distance": 1.4297,
           "accuracy_same": 0.9953, "accuracy_diff": 0.9983, "auc": 0.99912, "eer": 0.0051,
           "tar_at_far": {"1e-1": 0.999, "1e-2": 0.996, "1e-3": 0.991, "1e-4": 0.97, "1e-5": None, "1e-6": None},
           "pos_mean": 0.6214, "neg_mean": 0.0312, "pairs": 6000, "xnorm": 22.1034,
           "noflip": {"accuracy": 0.9955, "auc": 0.9987}}
REPORT = {name: dict(METRICS) for name in ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "a_long_set_name_from_a_path")}


def widths(text: str) -> int:
    return max(map(len, text.splitlines()))


def blocks(text: str) -> list:
    return [b.splitlines() for b in text.split("\n\n")]


def test_the_eval_table_of_a_representative_report_fits_in_100_columns():
    text = format_results_table(REPORT)
    header = ["set"] + [c for b in blocks(text) for c in b[0].split()[1:]]
    set_column = len(blocks(text)[0][1].split()[0]) + 2
    one_line = sum(len(b[1]) for b in blocks(text)) - set_column * (len(blocks(text)) - 1)
    assert len(header) == 19 and one_line > 150  # what used to be one line
    assert widths(text) <= MAX_WIDTH
    assert len(blocks(text)) >= 2
    for block in blocks(text):  # every block: header, rule, one row per set, set names first
        assert block[0].split()[0] == "set" and [row.split()[0] for row in block[2:]] == list(REPORT)
    values = {c: v for b in blocks(text) for c, v in zip(b[0].split(), b[2].split())}
    assert values["acc"] == "0.9968" and values["tar@1e-4"] == "0.9700" and values["tar@1e-6"] == "-"
    assert values["pairs"] == "6000" and values["acc_noflip"] == "0.9955"
    usual = {name: METRICS for name in ("lfw", "cfp_fp", "agedb_30")}
    final = format_table(usual)  # the trainer's final table: short headers, one block
    assert widths(final) <= MAX_WIDTH and len(blocks(final)) == 1 and final.split()[1] == "acc"
    assert widths(format_table(REPORT)) <= MAX_WIDTH  # a long set name: wrapped
    narrow = format_table({"lfw": METRICS})
    assert narrow.split()[:3] == ["set", "accuracy", "accuracy_std"]  # full names while they fit


def test_the_comparison_names_long_runs_above_the_table():
    a, b = "runs/" + "quickstart_" * 6 + "arcface", "runs/" + "quickstart_" * 6 + "cosface"
    text = format_comparison(compare_reports({"eval": REPORT}, {"eval": REPORT}, labels=(a, b)))
    lines = text.splitlines()
    assert lines[:2] == [f"A: {a}", f"B: {b}"] and lines[2].split() == ["set", "metric", "A", "B", "diff"]
    assert widths("\n".join(lines[2:])) <= MAX_WIDTH


def test_precision_auto_table_fits():
    path = {"status": "ok", "latency_ms": 3.512, "best_ms": 3.4, "min_cosine": 0.999871, "bound": 0.999}
    choice = {"precision": "int8", "cached": False, "isa": "avx512_core_amx_bf16_vnni", "speedup_vs_eager": 2.31,
              "eager_ms": 8.11, "eager_best_ms": 7.9,
              "paths": {"fp32": dict(path), "bf16": {**path, "status": "failed", "min_cosine": 0.9912},
                        "int8": dict(path),
                        "int8-weight-only": {"status": "skipped", "reason": "torchao is not installed; " * 6}}}
    lines = choice_lines(choice)
    assert max(map(len, lines)) <= MAX_WIDTH
    assert any("FAILED the bound" in line for line in lines)
    assert any(line.split()[:2] == ["compiled", "int8"] and line.endswith("<- auto") for line in lines)
    assert any("compiled int8-weight-only skipped: torchao" in line for line in lines)


def test_table_helpers():
    assert shorten("abcdefghij", 6) == "abc..." and shorten("abc", 6) == "abc"
    rows = [["name", "value"], ["x" * 300, "1"]]
    assert widths(table(rows)) <= MAX_WIDTH
    assert all(len(line) <= 60 for line in wrap("word " * 40 + "/a/very/long/path/" * 10, max_width=60))
    assert table([["a", "b"], ["1", "2"]], rule=False) == "a  b\n1  2"
