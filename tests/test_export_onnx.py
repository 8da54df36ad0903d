"""``pyro-vae export --format onnx``: files that onnxruntime runs without pyro_vae or torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.cli import main


def test_onnx_files_match_the_model_in_a_process_without_pyro_vae(tiny_run, tmp_path, capsys):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (the onnx extra)")
    run_dir, _ = tiny_run
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnxruntime.InferenceSession" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx"]
    vae = pyro_vae.load(run_dir)
    arrays = {}
    for b in (1, 5):  # batch sizes other than the export's example (2): the batch is dynamic
        x = torch.bernoulli(torch.full((b, *vae.event_shape), 0.3))
        z = torch.randn(b + 2, vae.latent_dim)
        arrays |= {f"x{b}": x, f"z{b}": z, f"encoded{b}": vae.encode(x)}
        arrays[f"decoded{b}"] = vae.decode(z)
    np.savez(tmp_path / "io.npz", **{k: v.numpy() for k, v in arrays.items()})
    code = (
        "import sys\n"
        "import numpy as np, onnxruntime as ort\n"
        f"d = {str(tmp_path)!r}\n"
        "io = np.load(d + '/io.npz')\n"
        "encoder = ort.InferenceSession(d + '/export/encoder.onnx')\n"
        "decoder = ort.InferenceSession(d + '/export/decoder.onnx')\n"
        "for b in (1, 5):\n"
        "    (z,) = encoder.run(None, {'x': io[f'x{b}']})\n"
        "    np.testing.assert_allclose(z, io[f'encoded{b}'], rtol=0, atol=1e-5)\n"
        "    (x,) = decoder.run(None, {'z': io[f'z{b}']})\n"
        "    np.testing.assert_allclose(x, io[f'decoded{b}'], rtol=0, atol=1e-5)\n"
        "assert 'pyro_vae' not in sys.modules\n"
        "assert not any(m.split('.')[0] in ('pyro', 'torch') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


def test_onnx_without_its_packages_is_one_line_and_exit_2_before_any_work(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    out = tmp_path / "export"
    # a run that does not exist: the packages are checked before the run is read
    code = main(["export", str(tmp_path / "no-run"), "--format", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "onnxscript" in err and 'pip install -e ".[onnx]"' in err
    assert not out.exists()


def test_onnx_export_of_a_low_rank_guide_and_a_continuous_bernoulli_likelihood(tmp_path):
    # the low-rank q builds a Cholesky factor that ONNX lacks but its mean does not use; the
    # continuous Bernoulli mean is off by ~1e-3 in float32 near p = 1/2 in torch itself
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the onnx extra)")
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=f"{name} is not installed (the onnx extra)")
    from pyro_vae.export import export

    model = pyro_vae.ModelConfig(
        latent_dim=3,
        guide=pyro_vae.ComponentConfig("low-rank", {"rank": 2}),
        likelihood=pyro_vae.ComponentConfig("continuous-bernoulli", {}),
        encoder=pyro_vae.ComponentConfig("mlp", {"hidden": [16]}),
        decoder=pyro_vae.ComponentConfig("mlp", {"hidden": [16]}),
    )
    vae = pyro_vae.build_vae(model, (4, 5)).eval()
    encoder_path, decoder_path = export(vae, tmp_path, "onnx")
    x, z = torch.rand(6, 4, 5), torch.randn(9, 3)
    (encoded,) = ort.InferenceSession(str(encoder_path)).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(encoded, vae.encode(x).numpy(), rtol=0, atol=1e-5)
    (decoded,) = ort.InferenceSession(str(decoder_path)).run(None, {"z": z.numpy()})
    assert decoded.shape == (9, 4, 5)
    np.testing.assert_allclose(decoded, vae.decode(z).numpy(), rtol=0, atol=2e-2)
