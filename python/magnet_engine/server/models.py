"""What the service runs on: the loaded models (`Models`) and how to load them (`ModelSpec`).
One loader for `magnet-engine serve` in one process and for every Ray replica, so a load option
given to either reaches the model."""
from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

DEMO_NOTE = "Demo model with random (untrained) weights: it makes noise, not music."
DEMO_NAME = "demo-tiny (random weights)"


@dataclasses.dataclass(frozen=True)
class Models:
    music: tp.Any           # a MAGNeT, or anything with its interface (a Ray ingress: its ModelCard)
    speech: tp.Any = None   # a PlayDiffusion when POST /v1/speech/edit is served (a Ray ingress: its SpeechCard)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Every load option of `magnet-engine serve` (its flags, or a Serve config file's args);
    `model` None: the embedded random-weight demo model."""

    model: tp.Optional[str] = None
    t5: tp.Optional[str] = None
    device: tp.Optional[str] = None     # None: CUDA when there is one (a Ray replica's, when given a GPU), else CPU
    engine: str = "fast"
    precision: tp.Optional[str] = None
    compile: bool = False
    cuda_graphs: bool = False
    speech: tp.Optional[str] = None     # PlayDiffusion: a directory, a Hub id or 'random'; None: no speech route
    cache_dir: tp.Optional[str] = None  # where the demo model is built (on a cluster: a path every node can write)
    threads: tp.Optional[int] = None    # torch CPU threads (a Ray replica: its num_cpus, not the node's cores)

    @property
    def note(self) -> str:
        """What the demo page says about the model."""
        return DEMO_NOTE if self.model is None else ""

    def demo_dir(self) -> Path:
        """The demo model's directory, built on first use."""
        from magnet_engine.demo import DEFAULT_CACHE, cached_demo_model

        return cached_demo_model(self.cache_dir or DEFAULT_CACHE, "tiny")

    def prepare(self) -> None:
        """Builds the random-weight models the spec names, here and once: replicas starting
        together on one node would each build them."""
        if self.model is None:
            self.demo_dir()
        if self.speech is not None:
            from magnet_engine.playdiffusion import RANDOM_MODEL, random_model_dir

            if self.speech == RANDOM_MODEL:
                random_model_dir()

    def load(self) -> Models:
        from magnet_engine.api import MAGNeT

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        options = dict(device=self.device, t5=self.t5, engine=self.engine, precision=self.precision,
                       compile=self.compile, cuda_graphs=self.cuda_graphs)
        if self.model is None:
            music = MAGNeT.from_pretrained(self.demo_dir(), name=DEMO_NAME, **options)
        else:
            music = MAGNeT.get_pretrained(self.model, **options)
        speech = None
        if self.speech is not None:
            from magnet_engine.playdiffusion import PlayDiffusion

            speech = PlayDiffusion(self.speech, device=self.device)
        return Models(music, speech)
