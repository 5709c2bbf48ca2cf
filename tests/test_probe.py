import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from benchmark.evaluation.probe import accuracy, expected_calibration_error, fit_probe


@pytest.mark.parametrize("num_classes", [2, 4])
def test_probe_matches_direct_sklearn_fit(num_classes):
    rng = np.random.default_rng(0)
    y = np.arange(200) % num_classes
    x = (rng.normal(size=(200, 16)) + y[:, None] * 0.3).astype(np.float32)
    test = (rng.normal(size=(80, 16)) + (np.arange(80) % num_classes)[:, None] * 0.3).astype(np.float32)
    probe = fit_probe(torch.from_numpy(x), torch.from_numpy(y), num_classes)
    scaler = StandardScaler().fit(x.astype(np.float64))
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(scaler.transform(x.astype(np.float64)), y)
    expected = clf.predict_proba(scaler.transform(test.astype(np.float64)))
    got = probe.logits(torch.from_numpy(test)).double().softmax(1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_probe_never_predicts_a_class_absent_from_its_fit():
    x = torch.randn(40, 8)
    y = torch.arange(40) % 3  # classes 0..2 of 5
    probe = fit_probe(x, y, num_classes=5)
    assert set(probe.logits(torch.randn(100, 8)).argmax(1).tolist()) <= {0, 1, 2}


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct): bins (0.8,0.867]? use 15 bins:
    # 0.9 falls in (0.8667, 0.9333], 0.6 in (0.5333, 0.6]
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1])
    logits = probs.log()
    expected = 100 * ((2 / 3) * abs(0.9 - 0.5) + (1 / 3) * abs(0.6 - 1.0))
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-6)
    assert accuracy(logits, labels) == pytest.approx(200 / 3)


def test_lp_evaluator_on_real_digits_equals_direct_sklearn_fit():
    from benchmark.config import EvalConfig
    from benchmark.evaluation.evaluate import EvalDataset, evaluate_round, extract_features
    from benchmark.evaluation.multihead import MultiHeadClassifier
    from benchmark.models.factory import create_model
    from tasks.loading import load_split

    train = load_split("digits", "train", 64, max_per_class=20, seed=3)
    test = load_split("digits", "test", 64, max_per_class=12, seed=3)
    model = MultiHeadClassifier(create_model("efficientnet_lite0", "package", 64))
    ds = EvalDataset("digits", [str(i) for i in range(10)], ("{}",), train, test)
    result = evaluate_round(model, [ds], {}, EvalConfig(), seed=3)
    f_train = extract_features(model.encoder, train.x).double().numpy()
    f_test = extract_features(model.encoder, test.x).double().numpy()
    scaler = StandardScaler().fit(f_train)
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=3).fit(scaler.transform(f_train), train.y.numpy())
    direct = 100.0 * (clf.predict(scaler.transform(f_test)) == test.y.numpy()).mean()
    assert result.cells["lp"]["digits"] == pytest.approx(direct, abs=1e-9)
    assert 50 < direct <= 100


def test_lp_init_head_is_logistic_regression_on_unit_features_with_c_chosen_on_val():
    from benchmark.evaluation.probe import fit_normalized_head

    rng = np.random.default_rng(1)
    y, yv = np.arange(120) % 3, np.arange(60) % 3
    x = rng.normal(size=(120, 12)) + 2.0 * np.eye(3, 12)[y]
    xv = rng.normal(size=(60, 12)) + 2.0 * np.eye(3, 12)[yv]
    weight, bias, C = fit_normalized_head(torch.tensor(x), torch.tensor(y), torch.tensor(xv), torch.tensor(yv), 3,
                                          Cs=(1e-3, 10.0))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    scores = {c: LogisticRegression(C=c, max_iter=1000, random_state=0).fit(unit(x), y).score(unit(xv), yv)
              for c in (1e-3, 10.0)}
    assert C == max(scores, key=scores.get)
    clf = LogisticRegression(C=C, max_iter=1000, random_state=0).fit(unit(x), y)
    np.testing.assert_allclose(weight.numpy(), clf.coef_, rtol=1e-5, atol=1e-6)
    # the head scores raw features by normalizing them itself
    from benchmark.evaluation.multihead import NormalizedLinear

    head = NormalizedLinear(12, 3)
    head.load(weight, bias)
    got = head(torch.tensor(xv, dtype=torch.float32)).argmax(1).numpy()
    assert (got == clf.predict(unit(xv))).mean() == 1.0



def test_the_demo_lp_init_does_not_depend_on_the_blas_threads_of_the_process():
    """The demo protocol's LP-init (EfficientNet-Lite0 features of digits at 32 px, 12 per class)
    chose C=1e6 with BLAS on two threads -- one process -- and C=1e-2 on one -- each of two DDP
    ranks: lbfgs does not converge at a large C on these separable features, and its rounding
    follows the thread count. Fits now run on one BLAS thread whatever the process has."""
    from threadpoolctl import threadpool_limits

    from benchmark.config.schema import ModelConfig
    from benchmark.evaluation.evaluate import extract_features
    from benchmark.evaluation.probe import fit_normalized_head
    from benchmark.models.factory import build_model
    from tasks.loading import load_split

    encoder = build_model(ModelConfig(image_size=32))
    train, val = (load_split("digits", split, 32, None, 12, 0) for split in ("train", "val"))
    train_f, val_f = extract_features(encoder, train.x), extract_features(encoder, val.x)
    fits = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            fits.append((*fit_normalized_head(train_f, train.y, val_f, val.y, 10),
                         fit_probe(train_f, train.y, 10, C=1e6).weight))
    (w1, b1, c1, p1), (w2, b2, c2, p2) = fits
    assert c1 == c2 == 1e-2  # the choice one BLAS thread made, as the DDP ranks did
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and torch.equal(p1, p2)
