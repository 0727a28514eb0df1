"""``dermbatch run --ray``: the same run, with the models on a Ray cluster (Ray Data, an actor pool of Predictors).

The driver (this process) discovers the inputs and the resume state, writes every output and feeds the progress
bar, exactly as a local run does; only prediction moves. Ray Data streams the pending image paths, in blocks of
``--batch-size``, through ``map_batches`` over a pool of actors that each hold one ``Predictor`` (decode,
segment, crop, classify: the code a local run uses), and the results stream back in input order. An actor that
dies (its node lost) is restarted by Ray and its batch retried; the driver still writes each image once.

Every node reads the input paths and the bundle itself: install the same dermbatch on every node and give them
the same view of the files (a shared filesystem, as Ray Data's own file readers need). Engines are built per node
into that node's cache, by one actor at a time (``dermbatch.backends.store.build_lock``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermbatch import __version__
from dermbatch.bundle import load_bundle
from dermbatch.errors import BackendError, UsageError
from dermbatch.imageio import DEFAULT_MAX_BYTES
from dermbatch.inputs import InputImage
from dermbatch.predictor import Predictor, crop_specs, parse_folds
from dermbatch.result import Result

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "dermbatch[ray]"'


def require_ray() -> None:
    """A clear error, before anything heavy is imported, when Ray Data is not installed."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise UsageError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}")


@dataclass(frozen=True)
class ClusterOptions:
    address: str = "auto"  # "auto": ray.init()'s own discovery; else e.g. "host:6379" or "ray://host:10001"
    actors: int | None = None  # default: one per GPU, else one per cpus_per_actor CPUs of the cluster
    cpus_per_actor: float | None = None  # default 1
    keep: frozenset[str] = frozenset({"image", "mask", "crop"})  # the arrays the driver's outputs need

    def __post_init__(self):
        if self.actors is not None and self.actors < 1:
            raise UsageError("--ray-actors must be at least 1")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise UsageError("--ray-cpus-per-actor must be more than 0")


class PredictActor:
    """One Ray Data actor: a Predictor, loaded once; each call turns a block of paths into pickled Results."""

    def __init__(self, predictor_options: dict, expected: dict, keep: frozenset[str]):
        import ray

        if __version__ != expected["version"]:
            raise BackendError(f"node {ray.util.get_node_ip_address()} has dermbatch {__version__}, the driver "
                               f"{expected['version']}: install the same version on every node")
        self.predictor = Predictor(**predictor_options)
        if self.predictor.bundle.hashes() != expected["weights"]:
            raise BackendError(f"node {ray.util.get_node_ip_address()}: bundle {self.predictor.bundle.path} has "
                               "other weights than the driver's; every node needs the same bundle")
        self.keep = keep
        self.name = f"{os.getpid()}@{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
        self.runtime = self.predictor.describe()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [InputImage(str(i), Path(p)) for i, p in zip(batch["image_id"], batch["path"], strict=True)]
        before = dict(self.predictor.seconds)
        results = list(self.predictor.predict(items))
        seconds = {k: (v - before.get(k, 0.0)) / len(results) for k, v in self.predictor.seconds.items()}
        payloads = [pickle.dumps({"result": strip_arrays(r, self.keep), "actor": self.name, "runtime": self.runtime,
                                  "seconds": seconds}, protocol=5) for r in results]
        return {"image_id": np.array([r.image_id for r in results]), "payload": np.array(payloads, dtype=object)}


def strip_arrays(result: Result, keep: frozenset[str]) -> Result:
    """Drop the arrays no requested output needs, so less travels back to the driver."""
    for name in ("image", "mask", "crop"):
        if name not in keep:
            setattr(result, name, None)
    return result


class RayPredictor:
    """What ``pipeline.run`` needs of a Predictor (``bundle``, ``folds``, ``seconds``, ``describe``, ``predict``),
    with the prediction done by a Ray Data actor pool."""

    actor_class = PredictActor  # benchmarks/bench_ray.py swaps in a stub to measure the driver's own ceiling

    def __init__(self, cluster: ClusterOptions, *, model=None, backend="auto", device="auto", tta=None, folds="all",
                 batch_size=8, workers=2, precision=None, first_use=None, crop_scales="1", max_bytes=DEFAULT_MAX_BYTES):
        require_ray()
        import ray

        self.cluster, self.batch_size = cluster, batch_size
        self.bundle = load_bundle(model)  # checked here, once: a bad --model fails before the cluster is touched
        self.folds = parse_folds(folds, self.bundle)
        self.seconds: dict[str, float] = defaultdict(float)
        crop_specs(self.bundle, crop_scales)  # a bad value fails here, before the cluster is touched
        self.predictor_options = {"model": model, "backend": backend, "device": device, "tta": tta,
                                  "crop_scales": crop_scales, "folds": folds, "batch_size": batch_size,
                                  "workers": workers, "precision": precision, "first_use": first_use,
                                  "max_bytes": max_bytes}
        # Ray's own INFO/WARNING lines (execution plans, "progress bars disabled") only with dermbatch -v
        ray_level = logging.INFO if log.getEffectiveLevel() <= logging.DEBUG else logging.ERROR
        self._owns_ray = not ray.is_initialized()  # a caller's own ray.init() is left as it is
        if self._owns_ray:
            try:
                ray.init(address=None if cluster.address == "auto" else cluster.address, log_to_driver=False,
                         logging_level=ray_level, configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BackendError(f"--ray {cluster.address}: cannot connect to a Ray cluster ({exc})") from None
        import ray.data  # its logging set-up, then our level over it

        logging.getLogger("ray.data").setLevel(ray_level)
        self.actors, self.resources = self._pool_size(ray.cluster_resources(), device)
        self.actors_seen: set[str] = set()
        self.runtimes: dict[str, dict] = {}
        log.info("ray: %d nodes, %s; %d actors of %s", len(self._nodes()), _resource_text(ray.cluster_resources()),
                 self.actors, _resource_text(self.resources))

    def _pool_size(self, resources: dict, device: str) -> tuple[int, dict]:
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        cpus = self.cluster.cpus_per_actor or 1
        if gpus:
            return self.cluster.actors or gpus, {"CPU": cpus, "GPU": 1}
        return self.cluster.actors or max(1, int(resources.get("CPU", 1) // cpus)), {"CPU": cpus}

    @staticmethod
    def _nodes() -> list[dict]:
        import ray

        return [{"node": f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}",
                 "resources": {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU", "memory")}}
                for n in ray.nodes() if n.get("Alive")]

    def __enter__(self) -> RayPredictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        import ray

        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def describe(self) -> dict:
        runtimes = list({str(r): r for r in self.runtimes.values()}.values())
        runtime = runtimes[0] if len(runtimes) == 1 else {"backend": "ray (no result yet)" if not runtimes else "mixed",
                                                           "per_actor": self.runtimes}
        return {**runtime, "cluster": {"address": self.cluster.address, "nodes": self._nodes(),
                                       "actors_requested": self.actors, "resources_per_actor": self.resources,
                                       "actors": sorted(self.actors_seen)}}

    def predict(self, items: Iterable[InputImage]) -> Iterator[Result]:
        """Yield one Result per image, in input order; an image the cluster returned twice is written once."""
        import ray

        items = list(items)
        if not items:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows land in the order a local run writes them
        context.enable_progress_bars = False  # the driver's own bar counts the images
        blocks = -(-len(items) // self.batch_size)
        dataset = ray.data.from_items([{"image_id": i.image_id, "path": str(i.path)} for i in items],
                                      override_num_blocks=blocks)
        expected = {"version": __version__, "weights": self.bundle.hashes()}
        dataset = dataset.map_batches(
            self.actor_class, batch_size=self.batch_size, batch_format="numpy",
            fn_constructor_args=(self.predictor_options, expected, self.cluster.keep),
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.resources["CPU"], num_gpus=self.resources.get("GPU"))
        # Ray Data's actor pools restart a dead actor and retry its batch without limit (max_restarts=-1,
        # max_task_retries=-1 are its defaults): a lost node costs time, never a row.
        seen: set[str] = set()
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for payload in batch["payload"]:
                row = pickle.loads(payload)
                result: Result = row["result"]
                if result.image_id in seen:
                    log.warning("%s: returned twice by the cluster (a retried batch); written once", result.path)
                    continue
                seen.add(result.image_id)
                self.actors_seen.add(row["actor"])
                self.runtimes.setdefault(row["actor"], row["runtime"])
                for stage, value in row["seconds"].items():
                    self.seconds[stage] += value
                yield result


def _resource_text(resources: dict) -> str:
    return ", ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if resources.get(k))
