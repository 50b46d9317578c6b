"""Dense CRF on the CPU: wsss_fast against pydensecrf2, side by side in one process.

A real 500x375 photograph, softmax probabilities over M labels, 10 mean-field steps;
every timed call builds the lattices too (pydensecrf2: DenseCRF2D + addPairwise* +
inference). Groups put the two libraries next to each other:
- one image, one thread, for the parameter sets of performance.md;
- one image with every thread (pydensecrf2 holds the GIL: one thread is all it uses);
- a batch of 8 images (pydensecrf2 image by image, wsss_fast batched);
- label counts 2, 21, 81;
- the drop-in's copy and check of its input arrays (finite_copy against numpy).
"""

import numpy as np
import pydensecrf.densecrf as pydensecrf
import pytest
import torch

import wsss_fast.crf as wsss_crf
from tests.crf_inputs import PARAMETER_SETS, PHOTOS, load_photo, run_densecrf2d, synthetic_softmax
from wsss_fast.ops import dense_crf

ROUNDS = 5


def _inputs(labels: int, photo: str = "coffee"):
    image = load_photo(photo)
    probs = synthetic_softmax(image, labels, seed=1)
    return image, probs


def _time(benchmark, function):
    benchmark.pedantic(function, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("params_name", ["psa_softmax", "deeplab", "toco_final"])
@pytest.mark.parametrize("library", ["pydensecrf2", "wsss_fast"])
def test_one_image_one_thread(benchmark, threads, library, params_name):
    params = PARAMETER_SETS[params_name]
    image, probs = _inputs(21)
    unary = params.make_unary(probs)
    threads(1)
    module = pydensecrf if library == "pydensecrf2" else wsss_crf
    benchmark.group = f"crf 500x375 M=21 10 it, {params_name}, one thread"
    benchmark.extra_info.update(library=library, threads=1, labels=21, params=params_name)
    _time(benchmark, lambda: run_densecrf2d(module, image, unary, params))


@pytest.mark.parametrize("library", ["pydensecrf2", "wsss_fast"])
def test_one_image_all_threads(benchmark, library):
    params = PARAMETER_SETS["psa_softmax"]
    image, probs = _inputs(21)
    unary = params.make_unary(probs)
    module = pydensecrf if library == "pydensecrf2" else wsss_crf
    benchmark.group = "crf 500x375 M=21 10 it, psa_softmax, all threads"
    benchmark.extra_info.update(library=library, threads=torch.get_num_threads(), labels=21)
    _time(benchmark, lambda: run_densecrf2d(module, image, unary, params))


@pytest.mark.parametrize("library", ["pydensecrf2", "wsss_fast"])
def test_batch_of_eight(benchmark, library):
    params = PARAMETER_SETS["psa_softmax"]
    images, probs = zip(*[_inputs(21, PHOTOS[i % len(PHOTOS)]) for i in range(8)], strict=True)
    benchmark.group = "crf batch 8 x 500x375 M=21 10 it, psa_softmax, all threads"
    benchmark.extra_info.update(library=library, threads=torch.get_num_threads(), batch=8)
    if library == "pydensecrf2":
        unaries = [params.make_unary(p) for p in probs]

        def run():
            for image, unary in zip(images, unaries, strict=True):
                run_densecrf2d(pydensecrf, image, unary, params)

    else:
        image_batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        prob_batch = torch.from_numpy(np.stack(probs))

        def run():
            dense_crf(
                image_batch,
                prob_batch,
                gaussian=(params.gaussian_sxy, params.gaussian_compat),
                bilateral=(params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat),
                iterations=params.iterations,
            )

    _time(benchmark, run)


@pytest.mark.parametrize("labels", [2, 21, 81])
@pytest.mark.parametrize("library", ["pydensecrf2", "wsss_fast"])
def test_label_scaling_one_thread(benchmark, threads, library, labels):
    params = PARAMETER_SETS["psa_softmax"]
    image, probs = _inputs(labels)
    unary = params.make_unary(probs)
    threads(1)
    module = pydensecrf if library == "pydensecrf2" else wsss_crf
    benchmark.group = f"crf 500x375 M={labels} 10 it, psa_softmax, one thread"
    benchmark.extra_info.update(library=library, threads=1, labels=labels)
    _time(benchmark, lambda: run_densecrf2d(module, image, unary, params))


def _numpy_copy_and_check(array: np.ndarray) -> np.ndarray:
    """The plain path the drop-in takes for other dtypes: np.array, then aminmax."""
    copy = np.array(array, dtype=np.float32, order="C", copy=True)
    if not torch.stack(torch.aminmax(torch.from_numpy(copy))).isfinite().all():
        raise ValueError("unary contains NaN or infinite values")
    return copy


@pytest.mark.parametrize("implementation", ["numpy", "finite_copy"])
def test_input_copy(benchmark, threads, implementation):
    """The drop-in's copy and check of a 21-label 500x375 unary (setUnaryEnergy)."""
    _, probs = _inputs(21)
    unary = wsss_crf.unary_from_softmax(probs)
    threads(1)

    def function():
        if implementation == "numpy":
            return _numpy_copy_and_check(unary)
        return torch.ops.wsss_fast.finite_copy(torch.from_numpy(unary), "unary")

    benchmark.group = "drop-in input copy, float32 (21, 500*375), one thread"
    benchmark.extra_info.update(implementation=implementation, threads=1)
    _time(benchmark, function)
