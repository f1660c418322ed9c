"""What default-deny costs on real files: the README's false-positive table, made here with the
real libraries and checked. Run as a script to write the files for bench/audit_bench.py:

    .venv/bin/python tests/python/test_audit_false_positives.py /tmp/fp
"""

import argparse
import json
import pathlib
import random
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from conftest import run  # noqa: E402

# file -> the verdict the README states
EXPECTED = {
    "pytorch_model.bin": "clean",
    "pytorch_model_legacy.bin": "clean",
    "resnet18_whole.pt": "other",
    "mobilenet_v3_whole.pt": "other",
    "training_ckpt.pt": "other",
    "sklearn_pipeline.joblib": "other",
    "sklearn_forest.joblib": "other",
    "sk_gb.joblib": "other",
    "sk_hgb.joblib": "other",
    "sk_knn.joblib": "other",
    "sk_svc.joblib": "other",
    "sk_kmeans.joblib": "other",
    "sk_pca.joblib": "other",
    "resnet18_scripted.pt": "other",
    "own_class.pt": "unknown call",
}


class Net:  # a class of the user's own script (pickled as __main__.Net)
    pass


def make(out: pathlib.Path):
    import argparse as ap

    import joblib
    import numpy as np
    import torch
    import torchvision
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.ensemble import (GradientBoostingClassifier, HistGradientBoostingClassifier,
                                  RandomForestClassifier)
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    torch.save(m, out / "resnet18_whole.pt")
    torch.save(torchvision.models.mobilenet_v3_small(), out / "mobilenet_v3_whole.pt")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": 3,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()},
                "args": ap.Namespace(lr=1e-3, name="run"),
                "path": pathlib.PurePosixPath("/data/x")}, out / "training_ckpt.pt")
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, vocab_size=99))
    torch.save(bert.state_dict(), out / "pytorch_model.bin")
    torch.save(bert.state_dict(), out / "pytorch_model_legacy.bin",
               _use_new_zipfile_serialization=False)
    rng = np.random.default_rng(0)
    X = rng.random((60, 4))
    y = (X[:, 0] > 0.5).astype(int)
    joblib.dump(Pipeline([("s", StandardScaler()), ("lr", LogisticRegression())]).fit(X, y),
                out / "sklearn_pipeline.joblib")
    joblib.dump(RandomForestClassifier(n_estimators=3).fit(X, y), out / "sklearn_forest.joblib")
    for name, est in [("gb", GradientBoostingClassifier(n_estimators=3)),
                      ("hgb", HistGradientBoostingClassifier(max_iter=3)),
                      ("knn", KNeighborsClassifier()), ("svc", SVC())]:
        joblib.dump(est.fit(X, y), out / f"sk_{name}.joblib")
    joblib.dump(KMeans(2, n_init=1).fit(X), out / "sk_kmeans.joblib")
    joblib.dump(PCA(2).fit(X), out / "sk_pca.joblib")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torchvision.models.resnet18().eval()).save(out / "resnet18_scripted.pt")
    Net.__module__ = "__main__"
    sys.modules["__main__"].Net = Net
    try:
        torch.save({"model": m.state_dict(), "net": Net()}, out / "own_class.pt")
    finally:
        del sys.modules["__main__"].Net


@pytest.mark.filterwarnings("ignore")
def test_the_false_positive_table(tmp_path):
    pytest.importorskip("sklearn")
    make(tmp_path)
    p = run("audit", tmp_path, "--json", check=False)
    got = {pathlib.Path(f["path"]).name: f for f in json.loads(p.stdout)["files"]}
    assert {n: f["verdict"] for n, f in got.items()} == EXPECTED
    assert got["own_class.pt"]["unknown_calls"] == ["__main__.Net"]
    assert p.returncode == 1
    p = run("audit", tmp_path, "--allow", "__main__.Net", check=False)
    assert p.returncode == 0


if __name__ == "__main__":
    a = argparse.ArgumentParser()
    a.add_argument("out", type=pathlib.Path)
    make(a.parse_args().out)
