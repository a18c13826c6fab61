"""Export: BN folding, the PReLU rewrite, ONNX/TorchScript parity on real and synthetic faces,
metadata, atomic writes, int8 accuracy and size, the size targets, `bench` and the CLI contract."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from marginface.cli import main
from marginface.data.synthetic import render_identities, synthetic_pair_set
from marginface.data.transforms import to_tensor
from marginface.data.verification import load_lfw_dir
from marginface.deploy.export import compare_embeddings, export_model, export_onnx
from marginface.deploy.fold import count_batchnorm, fold_batchnorm, regroup_conv, regroup_thin_convs, rewrite_prelu
from marginface.deploy.load import load_model, random_backbone
from marginface.errors import UserError
from marginface.evaluate.runner import evaluate_pair_set
from marginface.models import build_backbone


from shared_data import need  # noqa: E402  (tests/shared_data.py)




@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A quarter-width mbf trained for 60 steps on synthetic faces at 32 px (~10 s): good enough
    that int8 errors would show in accuracy, with a checkpoint whose last_eval has a threshold."""
    from marginface.train.runconfig import load_config
    from marginface.train.trainer import Trainer

    cfg = load_config(None, [
        "model.input_size=32", "model.width_mult=0.25", "model.embedding_size=128",
        "data.synthetic.identities=100", "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=60", "data.synthetic.val_images_per_identity=5",
        "data.synthetic.val_pairs=600", "train.batch_size=64", "train.amp=none", "train.max_steps=60",
        "train.log_every=1000", "data.num_workers=0", "schedule.warmup_steps=5", "train.deterministic=true"])
    run = tmp_path_factory.mktemp("run")
    report = Trainer(cfg, run, console=False).fit()
    assert report["eval"]["synthetic"]["accuracy"] > 0.6, "the fixture model did not learn"
    return run


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


# ---------------------------------------------------------------------------------------------- folding
@pytest.mark.parametrize("name,kw", [("mbf", {"width_mult": 0.25}), ("mobilefacenet_se", {"width_mult": 0.25}),
                                     ("iresnet18", {"width_mult": 0.25})])
def test_fold_batchnorm_is_exact(name, kw):
    model = _randomise_bn(build_backbone(name, input_size=32, **kw))
    folded = fold_batchnorm(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    if name.startswith(("mbf", "mobilefacenet")):
        assert count_batchnorm(folded) == 0  # every BN follows a conv or the embedding linear
    else:
        # iresnet: the pre-activation BNs (before a conv) must stay; the rest fold
        assert 0 < count_batchnorm(folded) < count_batchnorm(model)
    assert folded.input_size == 32 and folded.embedding_size == model.embedding_size
    assert count_batchnorm(model) > 0  # the original is untouched


def test_prelu_rewrite_is_exact_for_any_slope():
    model = build_backbone("mbf", input_size=32, width_mult=0.25).eval()
    slopes = [torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.7])]
    for m in model.modules():
        if isinstance(m, torch.nn.PReLU):
            m.weight.data.copy_(slopes[0].repeat(m.num_parameters // 5 + 1)[: m.num_parameters])
    rewritten = rewrite_prelu(fold_batchnorm(model))
    assert not any(isinstance(m, torch.nn.PReLU) for m in rewritten.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), rewritten(x)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("in_ch,groups,per_group,expect_groups", [
    (16, 8, 4, 4),    # 2 channels per group -> 4: half as many groups
    (16, 8, 8, 2),    # -> 8 per group
    (12, 6, 4, 3),    # 6 groups of 2 -> 3 groups of 4
    (12, 4, 4, 4),    # 3 per group does not divide 4: unchanged
])
def test_regroup_conv_is_the_same_function(in_ch, groups, per_group, expect_groups):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_ch, 2 * in_ch, 3, stride=2, padding=1, groups=groups, bias=True).eval()
    wide = regroup_conv(conv, per_group)
    assert wide.groups == expect_groups and wide.weight.shape[1] == in_ch // expect_groups
    x = torch.randn(2, in_ch, 9, 9)
    with torch.no_grad():
        assert torch.allclose(wide(x), conv(x), atol=1e-5)


def test_regroup_leaves_depthwise_dense_and_uneven_convs_alone():
    depthwise = torch.nn.Conv2d(8, 8, 3, groups=8)
    dense = torch.nn.Conv2d(8, 8, 3)
    uneven = torch.nn.Conv2d(6, 6, 3, groups=3)  # 2 per group, 3 groups cannot merge in pairs
    assert all(regroup_conv(c, 4) is c for c in (depthwise, dense, uneven))
    model = _randomise_bn(build_backbone("mbf", input_size=32, width_mult=0.25))
    folded = fold_batchnorm(model)

    def thin(net):
        return [m for m in net.modules()
                if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and 1 < m.in_channels // m.groups < 4]

    depthwise_before = sum(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in folded.modules())
    regrouped = regroup_thin_convs(fold_batchnorm(model))
    assert len(thin(folded)) == 1 and not thin(regrouped)  # mbf's stem was the one thin conv
    assert depthwise_before > 10 and depthwise_before == sum(
        isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in regrouped.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(regrouped(x), folded(x), rtol=1e-4, atol=1e-4 * folded(x).abs().max().item())


# ---------------------------------------------------------------------------------------------- ONNX
def test_onnx_export_parity_metadata_and_graph(trained_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    report = export_model(trained_run, out)
    torch_model = load_model(trained_run)
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "PRelu" not in ops  # folded; PReLU in Max form
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 13
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["input_size"] == "32,32" and meta["color_order"] == "RGB" and meta["layout"] == "NCHW"
    assert meta["mean"] == "127.5,127.5,127.5" and meta["std"] == "127.5,127.5,127.5"
    assert meta["normalize"] == "arcface" and meta["embedding_size"] == "128"
    assert abs(float(meta["threshold"]) - torch_model.threshold) < 1e-6 and meta["threshold_source"] == "synthetic"
    assert report["metadata"]["bn_folded"] == "true"
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")  # dynamic batch axis

    exported = load_model(out, threads=1)
    assert exported.threshold == pytest.approx(torch_model.threshold, abs=1e-6)
    assert exported.input_size == (32, 32) and exported.normalize == "arcface"
    # synthetic faces and the real aligned LFW faces; several batch sizes
    synthetic = render_identities(range(30), 1, 32, seed=9)
    lfw = load_lfw_dir(need("verification/lfw_mini"), image_size=32).images
    for name, images in (("synthetic", synthetic), ("lfw_mini", lfw)):
        x = to_tensor(images)
        with torch.no_grad():
            ref = torch_model(x).numpy()
        one_by_one = np.concatenate([exported(x[i : i + 1]).numpy() for i in range(3)])
        got = exported(x).numpy()
        stats = compare_embeddings(ref, got)
        with capsys.disabled():
            print(f"\n[parity {name}] {stats['images']} faces: min cosine {stats['min_cosine']:.8f}, "
                  f"max abs diff {stats['max_abs_diff']:.2e}")
        assert stats["min_cosine"] > 0.9999
        assert np.allclose(one_by_one, got[:3], atol=1e-4)


def test_torchscript_export_roundtrip(trained_run, tmp_path):
    out = tmp_path / "model.ts"
    report = export_model(trained_run, out, fmt="torchscript")
    assert report["parity"]["min_cosine"] > 0.9999
    with pytest.raises(UserError, match="is a TorchScript archive, which runs code when loaded"):
        load_model(out)  # loading TorchScript runs its code: only when asked
    loaded = load_model(out, trust_code=True)
    ref = load_model(trained_run)
    assert loaded.input_size == (32, 32) and loaded.normalize == "arcface"
    assert loaded.threshold == pytest.approx(ref.threshold)


def test_eval_accepts_onnx_and_matches_checkpoint(trained_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    export_model(trained_run, out, check=False)
    ps_dir = tmp_path / "pairs"
    ps = synthetic_pair_set(20, 4, 60, image_size=32, seed=3, name="held")
    ps_dir.mkdir()
    rows = ["file_x,file_y,same"]
    for k, (i, j) in enumerate(ps.pairs):
        for idx in (i, j):
            cv2.imwrite(str(ps_dir / f"{idx}.png"), ps.images[idx][..., ::-1])
        rows.append(f"{i}.png,{j}.png,{int(ps.issame[k])}")
    (ps_dir / "pairs.csv").write_text("\n".join(rows) + "\n")
    results = {}
    for model in (str(trained_run), str(out)):
        assert main(["eval", "--model", model, "--sets", str(ps_dir / "pairs.csv"), "--json"]) == 0
        results[model] = json.loads(capsys.readouterr().out)["pairs"]
    a, b = results.values()
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-4)


def test_export_is_atomic(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous good model")

    def broken_save(proto, path, *a, **kw):
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(UserError, match=r"model\.onnx: could not write \(disk full\)"):  # one line, not a traceback
        export_model(trained_run, out, check=False)
    assert out.read_bytes() == b"previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files left


def test_int8_accuracy_drop_and_size(trained_run, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, image in enumerate(render_identities(range(64), 2, 32, seed=0)):  # training identities
        cv2.imwrite(str(calib / f"{i}.png"), image[..., ::-1])
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_model(trained_run, fp32, check=False)
    report = export_model(trained_run, int8, int8=True, calib=calib)
    assert report["metadata"]["quantization"].startswith("int8-static-qdq-U8S8-per-channel")
    held_out = synthetic_pair_set(200, 6, 2000, image_size=32, seed=5, name="held_out")
    acc = {name: evaluate_pair_set(load_model(p, threads=1), held_out)["accuracy"]
           for name, p in (("fp32", fp32), ("int8", int8))}
    size = {name: p.stat().st_size for name, p in (("fp32", fp32), ("int8", int8))}
    with capsys.disabled():
        print(f"\n[int8] held-out accuracy fp32 {acc['fp32']:.4f} int8 {acc['int8']:.4f} "
              f"(drop {100 * (acc['fp32'] - acc['int8']):+.2f} points); size {size['fp32'] / 2**20:.3f} -> "
              f"{size['int8'] / 2**20:.3f} MiB ({size['fp32'] / size['int8']:.2f}x smaller)")
    assert acc["fp32"] - acc["int8"] <= 0.005
    assert size["int8"] < size["fp32"] / 1.5
    # Only the grouped (not depthwise) stem conv stays float: every other conv reads int8 weights.
    import onnx

    from marginface.deploy.quantize import grouped_conv_nodes

    assert len(grouped_conv_nodes(onnx.load(str(fp32)))) == 1  # mbf: the stem's 2-channel groups
    graph = onnx.load(str(int8)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    float_convs = [n.name for n in convs if n.input[1] not in dequantized]
    assert len(float_convs) == 1 and "stem" in float_convs[0], float_convs
    assert len(convs) > 40


def test_size_targets(tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, image in enumerate(render_identities(range(8), 1, 112, seed=0)):
        cv2.imwrite(str(calib / f"{i}.png"), image[..., ::-1])
    sizes = {}
    for name, kw in (("mbf", {}), ("mbf-int8", {"int8": True, "calib": calib}), ("mobilefacenet", {})):
        out = tmp_path / f"{name}.onnx"
        export_model(None, out, backbone=name.split("-")[0], check=False, **kw)
        sizes[name] = out.stat().st_size / 1e6
    with capsys.disabled():
        print("\n[sizes MB] " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()))
    assert sizes["mbf"] < 9.0
    assert sizes["mbf-int8"] < 2.5
    assert sizes["mobilefacenet"] < 4.5


# ---------------------------------------------------------------------------------------------- bench + CLI
def test_bench_json_contract(capsys):
    assert main(["bench", "--backbone", "mobilefacenet", "--input-size", "32", "--threads", "1",
                 "--runs", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("params", "file_mb", "gmacs", "latency_ms", "throughput_ips", "threads"):
        assert key in result
    assert set(result["latency_ms"]) == {"torch", "onnxruntime", "onnxruntime-int8"}
    for stats in result["latency_ms"].values():
        assert 0 < stats["median"] <= stats["p90"]
    assert all(v > 0 for v in result["throughput_ips"].values())
    assert result["threads"] == 1 and result["params"] > 0 and result["gmacs"] > 0


def test_bench_onnx_file(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    export_onnx(random_backbone("mobilefacenet", input_size=32), out)
    assert main(["bench", str(out), "--threads", "1", "--runs", "3", "--runtimes", "torch,onnxruntime", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["latency_ms"]) == {"onnxruntime"} and "torch" in result["skipped"]
    torch_macs = result["gmacs"]
    from marginface.models import count_macs

    assert torch_macs == pytest.approx(count_macs(random_backbone("mobilefacenet", input_size=32)) / 1e9, rel=0.02)


@pytest.mark.parametrize("argv,needle", [
    (["export", "--out", "x.onnx"], "RUN_DIR|CKPT or --backbone"),
    (["export", "--backbone", "mbf", "--int8", "--out", "x.onnx"], "--calib"),
    (["export", "/nonexistent/run", "--out", "x.onnx"], "no checkpoint found"),
    (["export", "--backbone", "mbf", "--opset", "9", "--out", "x.onnx"], "--opset 9"),
    (["export", "--backbone", "mbf", "--int8", "--calib", "/nonexistent", "--out", "x.onnx"], "not a directory"),
    (["bench", "--backbone", "nosuchnet", "--json"], "unknown backbone"),
    (["export", "--backbone", "mbf", "--format", "aoti", "--out", "x.onnx"], "must end in .pt2"),
    (["export", "--backbone", "mbf", "--precision", "bf16", "--out", "x.onnx"], "--precision bf16 needs --format aoti"),
    (["export", "--backbone", "mbf", "--format", "aoti", "--precision", "int8", "--out", "x.pt2"], "needs --calib"),
    (["export", "--backbone", "mbf", "--format", "aoti", "--batch-size", "0", "--out", "x.pt2"], "--batch-size"),
])
def test_cli_errors(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], captured.err
    assert captured.out == ""
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_export_json(trained_run, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["parity"]["min_cosine"] > 0.9999 and out.is_file()


def test_compiled_package_export_load_bench_and_bad_files(trained_run, tmp_path):
    """``--format aoti``: a .pt2 that load_model runs without recompiling, like the checkpoint."""
    from marginface.deploy.bench import bench
    from marginface.deploy.compiled import CompiledEmbedder

    out = tmp_path / "model.pt2"
    report = export_model(trained_run, out, fmt="aoti", batch_size=2)
    assert report["parity"]["min_cosine"] > 0.9999 and report["file_mb"] > 0.1
    assert (report["metadata"]["precision"], report["metadata"]["batch_size"]) == ("fp32", 2)
    with pytest.raises(UserError, match="is a compiled package, which runs native code when opened"):
        load_model(out)  # opening a package loads its native code: only when asked
    reference, package = load_model(trained_run), load_model(out, trust_code=True)
    assert isinstance(package, CompiledEmbedder) and package.model_path == str(out)
    assert (package.info.input_size, package.info.embedding_size) == (reference.info.input_size, 128)
    assert package.info == reference.info.replace(kind="compiled", source=str(out))
    assert package.threshold == pytest.approx(reference.threshold) and package.normalize == reference.normalize
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # 2 + 2 + 1 padded
    with torch.no_grad():
        assert torch.allclose(package(x), reference(x), atol=1e-4)
    with pytest.raises(ValueError, match="takes 3×32×32 images"):
        package(torch.randn(2, 3, 40, 40))
    with pytest.raises(UserError, match="pass --trust-code"):
        bench(out, runs=5, max_seconds=1, throughput_runs=3)
    result = bench(out, runs=5, max_seconds=1, throughput_runs=3, trust_code=True)
    assert set(result["latency_ms"]) == {"compiled-package"} and result["compiled_batch"] == 2
    assert result["input_size"] == [32, 32] and result["sizes_mb"]["pt2"] == pytest.approx(report["file_mb"], abs=1e-3)

    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="broken.pt2: not a loadable compiled package"):
        load_model(broken, trust_code=True)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed (int8 package)")
def test_int8_compiled_package_keeps_accuracy(trained_run, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, image in enumerate(render_identities(range(64), 2, 32, seed=0)):  # training identities
        cv2.imwrite(str(calib / f"{i}.png"), image[..., ::-1])
    out = tmp_path / "int8.pt2"
    report = export_model(trained_run, out, fmt="aoti", precision="int8", batch_size=16, calib=calib)
    assert report["int8"] and report["metadata"]["precision"] == "int8"
    assert 0.98 < report["parity"]["min_cosine"] < 0.99999  # int8 rounding: visible, small
    held_out = synthetic_pair_set(200, 6, 2000, image_size=32, seed=5, name="held_out")
    acc = {name: evaluate_pair_set(load_model(p, trust_code=True), held_out)["accuracy"]
           for name, p in (("fp32", trained_run), ("int8", out))}
    # 8-bit weights: within 0.5 points. Where oneDNN lacks VNNI the weights are 7-bit (no int16
    # saturation, docs/deployment.md), twice the rounding step: within 1 point (0.65 measured, AVX2 EPYC).
    allowed = 0.005 if report["metadata"]["int8_weight_range"] == [-128, 127] else 0.01
    assert acc["fp32"] - acc["int8"] <= allowed, acc
