"""Conformal prediction sets (cnnkit.conformal): the finite-sample guarantee on a real model's calibrated
probabilities over random calibration / held-out splits, the threshold against the order statistic it is
defined as, the record training stores, and the sets of `cnnkit predict --coverage` (both runtimes, an
ONNX file, an older model file), of `cnnkit serve` and of the report.

The real model: conftest's fast_mnist_run (the fast recipe on MNIST, 99.2% on test), its validation and
test splits pooled (16,000 images); and conftest's binary_run (MNIST 4 against 9)."""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit import conformal
from cnnkit.evaluate import load_split_for
from conftest import run_main
from test_hardening import one_line_error


def rank(n: int, coverage: float) -> int:
    """ceil((n + 1) * coverage) in exact arithmetic: the reference for conformal.rank_for."""
    return math.ceil(Fraction(str(coverage)) * (n + 1))


def reference_sets(probs: np.ndarray, stored: list[float], coverage: float) -> list[list[int]]:
    """The default score's sets written out: the top class, and every other class k with 1 - p_k at most
    the rank(n, coverage)-th smallest stored score, most probable first."""
    q = sorted(stored)[rank(len(stored), coverage) - 1]
    return [[k for k in np.argsort(-p, kind="stable") if k == p.argmax() or 1 - p[k] <= q] for p in probs]


@pytest.fixture(scope="module")
def pool(fast_mnist_run):
    """(calibrated probabilities (N, K), labels (N,)) of the fast-MNIST model on its validation and test
    splits together, in fp32 as predict computes them."""
    run, _ = fast_mnist_run
    model, info = cnnkit.load_model(run)
    probs, labels = [], []
    for name in ("val", "test"):
        split, _ = load_split_for(info, "mnist", name)
        probs.append(cnnkit.probabilities(model, info, split.images))
        labels.append(split.labels.numpy())
    return np.concatenate(probs), np.concatenate(labels)


@pytest.mark.slow  # the shared fast-MNIST run (20 s untrained), the pool (16 s on a busy 2-core EPYC), then 1 s
def test_the_threshold_is_the_order_statistic_the_guarantee_needs(pool):
    """quantile(scores, c) is the ceil((n + 1) c)-th smallest score, for real scores and sizes on both
    sides of each rank's rounding; a coverage the scores are too few for is refused naming the n it needs.
    (NumPy's np.quantile(s, ceil((n + 1) c) / n, method="higher") is the next score up for r < n: its
    virtual index r - r/n rounds up to the 0-based r; "inverted_cdf" meets r/n * n > r in floating point.)"""
    probs, labels = pool
    scores = conformal.conformity_scores(probs, labels)
    plain = 1 - probs[np.arange(len(labels)), labels]  # a score with no ties at 0
    rng = np.random.default_rng(0)
    for s in (scores, plain):
        for n in (19, 20, 99, 100, 999, 1000, 5999, len(s)):
            sample = rng.choice(s, n, replace=False)
            for c in (0.5, 0.9, 0.95, 0.99, 0.995, 0.999):
                if rank(n, c) > n:
                    with pytest.raises(cnnkit.CnnkitError, match="needs at least"):
                        conformal.quantile(sample, c)
                    continue
                want = np.sort(sample)[rank(n, c) - 1]
                assert conformal.quantile(sample, c) == want, (n, c)
                assert np.quantile(sample, rank(n, c) / n, method="higher") >= want  # NumPy's, one rank up
    with pytest.raises(cnnkit.CnnkitError, match=r"needs at least 999 calibration images.*on 998"):
        conformal.quantile(plain[:998], 0.999)
    assert conformal.quantile(plain[:999], 0.999) == plain[:999].max()  # 999 suffice: the largest score
    # Sets: prefixes by probability holding the top class, equal to the written-out rule.
    record = conformal.fit(probs[:5999], labels[:5999])
    sets = conformal.record_sets(record, probs[5999:], 0.999)
    assert sets == reference_sets(probs[5999:], record["scores"], 0.999)
    assert all(s[0] == p.argmax() for s, p in zip(sets, probs[5999:]))
    assert 1.03 < np.mean([len(s) for s in sets]) < 1.5


@pytest.mark.slow  # the shared fast-MNIST run, then 1 s
def test_coverage_on_held_out_images_lies_within_the_finite_sample_bound(pool):
    """Over random splits of the pool into n calibration and m held-out images, the held-out coverage
    averages within [c, c + 1/(n + 1)] (exchangeability holds by the random split, whatever the pool), up
    to 4 standard errors of the mean, and each split's lies within its distribution's 1e-6 tails.

    That distribution: given the calibration images, the true coverage is Beta(r, n + 1 - r) with
    r = ceil((n + 1) c), and the m held-out images draw from it: the covered count is beta-binomial,
    variance mu (1 - mu)(1/(n + 2) + 1/m) m^2 for mu = r / (n + 1). (Split from a fixed pool, a calibration
    part with more high scores leaves fewer to the held-out part, and the variance is mu (1 - mu)(1/n + 1/m):
    1,000 splits of a fast-MNIST pool measured 0.0047, 0.0035, 0.0016 at 0.90 / 0.95 / 0.99, as both give.)
    Its tails, not a normal's: at 0.999 eight misses are expected and the low tail is long. 1,000 per-split
    checks at 1e-6 each. The default score's ties at 0 (the top class) keep the upper bound only once the
    threshold is above 0: where the model is right more often than c, every set is the top class and the
    coverage is the accuracy."""
    from scipy.stats import betabinom
    probs, labels = pool
    n, splits = 8000, 200
    m = len(labels) - n
    default = conformal.conformity_scores(probs, labels)
    plain = 1 - probs[np.arange(len(labels)), labels]
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(labels)) for _ in range(splits)]
    cases = [(plain, c) for c in conformal.REPORT_LEVELS] + [(default, c) for c in (0.995, 0.999)]
    for scores, c in cases:
        covered = np.array([np.sum(scores[order[n:]] <= conformal.quantile(scores[order[:n]], c))
                            for order in orders])  # (splits,) held-out images covered
        counts = betabinom(m, rank(n, c), n + 1 - rank(n, c))
        assert np.all((counts.ppf(1e-6) <= covered) & (covered <= counts.isf(1e-6))), c
        sem = counts.std() / m / math.sqrt(splits)
        assert c - 4 * sem <= covered.mean() / m <= c + 1 / (n + 1) + 4 * sem, (c, covered.mean() / m)
    # 0.90: the model (99.2%) already reaches it, so the threshold is 0 and each set is the top class alone
    record = conformal.fit(probs[:n], labels[:n])
    assert conformal.record_threshold(record, 0.9) == 0
    assert conformal.record_sets(record, probs[n:], 0.9) == [[int(p.argmax())] for p in probs[n:]]


@pytest.mark.slow  # the shared fast-MNIST run, then 1 s
def test_training_stores_the_validation_scores_and_measures_test_coverage(fast_mnist_run, pool):
    """The model file's record: the validation split's scores under the model file's temperature, sorted,
    each rounded up to 6 significant digits; metrics.json: coverage and mean set size on test at 0.90,
    0.95 and 0.99, as the stored scores give them."""
    run, metrics = fast_mnist_run
    info = cnnkit.read_info(run)
    probs, labels = pool
    n = info.data.sizes["val"]
    record = info.conformal
    assert record["score"] == conformal.DEFAULT_SCORE and len(record["scores"]) == n
    want = np.sort(conformal.conformity_scores(probs[:n], labels[:n]))
    stored = np.array(record["scores"])
    assert np.all(stored >= want) and np.allclose(stored, want, rtol=1e-5, atol=0)
    assert all(float(f"{v:.6g}") == v for v in record["scores"][-50:])
    test_p, test_y = probs[n:], labels[n:]
    figures = metrics["test_conformal"]
    assert figures["calibration_images"] == n and [r["coverage"] for r in figures["levels"]] == [0.9, 0.95, 0.99]
    for row in figures["levels"]:
        sets = reference_sets(test_p, record["scores"], row["coverage"])
        assert row["empirical_coverage"] == pytest.approx(np.mean([y in s for s, y in zip(sets, test_y)]), abs=2e-4)
        assert row["mean_set_size"] == pytest.approx(np.mean([len(s) for s in sets]), abs=2e-3)
        assert row["empirical_coverage"] >= row["coverage"] - 0.005  # 10,000 test images: sd 0.001 at 0.99


def write_pngs(pool_probs, folder, images, count: int = 24) -> list[str]:
    """MNIST test images as PNG files: the `count` // 2 the model is least sure of and as many it is sure of."""
    order = np.argsort(pool_probs.max(1))
    picked = [*order[:count // 2], *order[-count // 2:]]
    folder.mkdir()
    paths = []
    for i in picked:
        paths.append(str(folder / f"{i:05d}.png"))
        Image.fromarray(images[i, 0].numpy()).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def mnist_files(fast_mnist_run, pool, tmp_path_factory):
    """(paths, their calibrated probabilities (N, K)) of 24 MNIST test images written as PNG."""
    run, _ = fast_mnist_run
    info = cnnkit.read_info(run)
    test, _ = load_split_for(info, "mnist", "test")
    probs = pool[0][info.data.sizes["val"]:]
    paths = write_pngs(probs, tmp_path_factory.mktemp("conformal") / "png", test.images)
    return paths, probs[[int(p.split("/")[-1][:5]) for p in paths]]


def predicted(*args: str) -> list[dict]:
    r = run_main("predict", *args, "--json", "--workers", "1")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow  # the shared fast-MNIST run, then 6-11 s (an ONNX export, a fresh interpreter)
def test_predict_gives_each_image_its_set_on_both_runtimes(fast_mnist_run, mnist_files, tmp_path):
    """Sets hold the top-1 class, grow with coverage, equal the stored scores' sets, and are the same on
    PyTorch, onnxruntime and the ONNX file alone (its calibration record travels in the export)."""
    run, _ = fast_mnist_run
    paths, probs = mnist_files
    record = cnnkit.read_info(run).conformal
    previous = None
    for c in (0.99, 0.995, 0.999):
        rows = predicted(str(run), *paths, "--coverage", str(c), "--runtime", "torch")
        sets = [r["set"] for r in rows]
        assert sets == [[str(k) for k in s] for s in reference_sets(probs, record["scores"], c)]
        assert all(r["set"][0] == r["labels"][0] for r in rows)
        if previous is not None:
            assert all(set(a) <= set(b) for a, b in zip(previous, sets))
        previous = sets
    assert max(len(s) for s in sets) >= 2 and min(len(s) for s in sets) == 1
    assert [r["set"] for r in predicted(str(run), *paths, "--coverage", "0.999", "--runtime", "onnx")] == sets
    onnx = next((cnnkit.utils.cache_dir() / "exports").glob("*.onnx"))
    assert [r["set"] for r in predicted(str(onnx), *paths, "--coverage", "0.999")] == sets
    code = ("import sys; from cnnkit.cli import main; "  # sets on the ONNX runtime, PyTorch never imported
            f"code = main(['predict', {str(onnx)!r}, {paths[0]!r}, '--coverage', '0.999', '--workers', '1']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"set at 0.999: {', '.join(sets[0])}" in r.stdout, r.stderr
    assert "set" not in predicted(str(run), *paths[:2], "--runtime", "torch")[0]  # without --coverage: as before
    out = tmp_path / "rows.csv"
    assert run_main("predict", str(run), *paths, "--coverage", "0.999", "--out", str(out), "--runtime", "torch",
                    "--workers", "1").returncode == 0
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[-2:] == ["set", "error"]
    assert [ln.split(",")[-2] for ln in lines[1:]] == [";".join(s) for s in sets]


def asgi_request(path: str, query: str, body: bytes, content_type: str):
    """(scope, receive, send, sent) of one POST to an ASGI app in this process (no socket): `sent` collects
    the response's messages."""
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "headers": [(b"content-type", content_type.encode()),
                                                         (b"content-length", str(len(body)).encode())],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
    return scope, receive, send, sent


def serve_answers(run, paths: list[str], queries: list[str]):
    """([(status, JSON)] per query, the Model) from the served app: the raw-body path (Front's fast path)
    for the first image, and multipart (FastAPI's route) for all of them, alternately."""
    from cnnkit.serve import Model, create_app
    model = Model(run, runtime="torch")
    app = create_app(model)
    boundary = "cnnkit-conformal"
    multipart = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{p}\"\r\n"
                         f"Content-Type: image/png\r\n\r\n".encode() + open(p, "rb").read() + b"\r\n"
                         for p in paths) + f"--{boundary}--\r\n".encode()

    async def ask():
        await model.start()
        answers = []
        try:
            for i, query in enumerate(queries):
                body, kind = ((open(paths[0], "rb").read(), "image/png") if i % 2 == 0 else
                              (multipart, f"multipart/form-data; boundary={boundary}"))
                scope, receive, send, sent = asgi_request("/predict", query, body, kind)
                await app(scope, receive, send)
                answers.append((sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))))
        finally:
            await model.stop()
        return answers
    return asyncio.run(ask()), model


@pytest.mark.slow  # the shared fast-MNIST run, then 3 s
def test_serve_answers_the_sets_predict_gives(fast_mnist_run, mnist_files):
    run, _ = fast_mnist_run
    paths, _ = mnist_files
    want = [r["set"] for r in predicted(str(run), *paths, "--coverage", "0.999", "--runtime", "torch")]
    answers, model = serve_answers(run, paths, ["coverage=0.999&top_k=2", "coverage=0.999", "top_k=2", "",
                                                "coverage=1.5", "coverage=2", "coverage=abc", "coverage=0.99999"])
    (s0, raw), (s1, multi), (s2, plain_raw), (s3, plain_multi) = answers[:4]
    assert s0 == s1 == s2 == s3 == 200
    assert raw["results"][0]["set"] == want[0] and raw["coverage"] == 0.999
    assert [r["set"] for r in multi["results"]] == want
    for plain in (plain_raw, plain_multi):  # without coverage: the response as before
        assert "coverage" not in plain and all("set" not in r for r in plain["results"])
    assert [r["top"] for r in plain_multi["results"]] == [r["top"] for r in multi["results"]]
    for status, body in answers[4:6]:  # Front's query parsing and FastAPI's both reach Model's check
        assert status == 422 and "between 0 and 1" in body["detail"]
    assert answers[6][0] == 422 and answers[7][0] == 422
    assert "needs at least 99,999 calibration images" in answers[7][1]["detail"]
    described = model.description()["calibration"]["conformal"]
    assert described == {"score": "lac", "calibration_images": 5999, "source": "stored in the model file"}


@pytest.mark.slow  # the shared multi-label and fast-MNIST runs, then 3 s
def test_multi_label_and_bad_coverages_are_refused_in_one_line(multi_label_run, fast_mnist_run, mnist_files):
    run, labels_csv = multi_label_run
    image = str(next((labels_csv.parent / "images" / "test").iterdir()))
    one_line_error(run_main("predict", str(run), image, "--coverage", "0.9"), "--coverage", "multi-label")
    mnist, _ = fast_mnist_run
    paths, _ = mnist_files
    for bad in ("0", "1", "1.5", "-0.1", "nan", "inf"):
        one_line_error(run_main("predict", str(mnist), paths[0], "--coverage", bad), "--coverage", "between 0 and 1")
    one_line_error(run_main("predict", str(mnist), paths[0], "--coverage", "0.9999"), "needs at least 9,999",
                   "calibrated on 5,999")
    one_line_error(run_main("predict", str(mnist), paths[0], "--coverage", "0.9", "--tta"), "--tta")
    from cnnkit.serve import Model
    model = Model(run, runtime="torch")
    with pytest.raises(cnnkit.serve.RequestError, match="multi-label"):
        asyncio.run(model.set_threshold(0.9))


@pytest.mark.slow  # the shared binary run, then 5-7 s (the report)
def test_an_older_binary_model_file_gets_its_sets_from_its_validation_split(binary_run, tmp_path):
    """A binary model (two classes from one logit): the report's table equals the stored scores' sets on
    test; a copy of the file without its record gets the same sets from predict and serve, computed from
    the validation split (and says so); with its data gone, a one-line error (serve: 422)."""
    import dataclasses

    from cnnkit.modelfile import load_model, save_model
    run, labels = binary_run
    model, info = load_model(run)
    test = cnnkit.load_dataset(str(labels), image_size=28, channels=1, seed=0, quiet=True).test
    probs = cnnkit.probabilities(model, info, test.images)  # (N, 2)
    r = run_main("evaluate", str(run), "--data", str(labels), "--out", str(tmp_path / "ev"), "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)["conformal"]
    for row in figures["levels"]:
        sets = reference_sets(probs, info.conformal["scores"], row["coverage"])
        assert row["empirical_coverage"] == pytest.approx(np.mean([y in s for s, y in zip(sets, test.labels)]))
        assert row["mean_set_size"] == pytest.approx(np.mean([len(s) for s in sets]))
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "<h2>Prediction sets</h2>" in page and "mean set at 95% coverage" in page
    assert f'{100 * figures["levels"][2]["empirical_coverage"]:.2f}%' in page
    # The older file: the same weights and metadata, without the record.
    old = tmp_path / "old"
    shutil.copytree(run, old)
    save_model(old / "model.safetensors", model, dataclasses.replace(info, conformal=None))
    assert cnnkit.read_info(old).conformal is None
    paths = [str(p) for p in test.paths[::20]]
    stored = predicted(str(run), *paths, "--coverage", "0.95", "--runtime", "torch")
    r = run_main("predict", str(old), *paths, "--coverage", "0.95", "--json", "--workers", "1", "--runtime", "torch")
    assert r.returncode == 0 and "computed now from 150 validation images" in r.stderr, r.stderr
    assert [row["set"] for row in json.loads(r.stdout)] == [row["set"] for row in stored]
    assert {len(row["set"]) for row in stored} <= {1, 2} and all(row["set"][0] in ("digit4", "digit9")
                                                                 for row in stored)
    answers, served = serve_answers(old, paths, ["top_k=2", "coverage=0.95&top_k=2"])  # computed on that request
    assert [row["set"] for row in answers[1][1]["results"]] == [row["set"] for row in stored]
    assert served.description()["calibration"]["conformal"]["source"].startswith("conformal calibration computed")
    gone = {**info.training, "data": str(tmp_path / "gone.csv")}
    save_model(old / "model.safetensors", model, dataclasses.replace(info, conformal=None, training=gone))
    one_line_error(run_main("predict", str(old), *paths[:1], "--coverage", "0.95"), "cannot load",
                   "compute prediction sets", "holds no conformal calibration")
    (plain, _), (status, body) = serve_answers(old, paths[:1], ["top_k=2", "coverage=0.95&top_k=2"])[0]
    assert plain == 200 and status == 422 and "cannot load" in body["detail"]
