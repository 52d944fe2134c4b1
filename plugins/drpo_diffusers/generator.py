"""One-step SD-Turbo and SDXL-Turbo generators: ``x0 = G_theta(z, prompt)`` with a frozen reference.

**Sampling convention.** We reproduce ``pipe(prompt, num_inference_steps=1, guidance_scale=0.0,
latents=z, output_type="latent")`` exactly, in a differentiable way. With the Turbo schedulers
(Euler / Euler ancestral, ``timestep_spacing="trailing"``) one step runs at t = 999 and:

* the scheduler's sample is ``s = init_noise_sigma * z`` (``init_noise_sigma`` is sigma_max here),
* the UNet sees ``scale_model_input(s) = s / sqrt(sigma^2 + 1)`` (= sqrt(1 - abar_999) * z),
* the Euler step to sigma = 0 returns the predicted clean latent: ``x0 = s - sigma * eps_hat`` for
  epsilon prediction (``x0 = -sigma/sqrt(sigma^2+1) * v + s/(sigma^2+1)`` for v-prediction). Euler
  ancestral adds no noise on its last step, so both schedulers are deterministic.

This differs from the official DrPO SD-Turbo code (method.md §6.1), which feeds the UNet ``z``
itself and re-projects ``x0`` to t = 0 (``0.9996 * x0 + 0.0292 * eps_hat``). We follow the pipeline
by default so that what is trained is exactly what users get from the pipeline with the exported
LoRA; ``one_step="official"`` (SD-Turbo only, the ``sd-turbo:paper`` preset) computes the official
latent instead, with the official code's constants (``OFFICIAL_ONE_STEP``)::

    eps_hat = unet(z, 999);  x0 = (z - 0.9977 * eps_hat) / 0.0683;  x = 0.9996 * x0 + 0.0292 * eps_hat

That latent is what its feature space sees, what is decoded and scored. A LoRA trained this way is
still exported for the pipeline, which samples with the pipeline's convention.

**Latents** are scaled latents (UNet space); ``decode`` divides by the VAE's scaling factor.

**Reference.** With LoRA (the default) the frozen base generator is the same UNet with its adapters
disabled, so it costs no memory. With full fine-tuning (``lora=False``) the reference is a deep copy
of the base UNet, which doubles the UNet's memory.

**The frozen base with gradient** (:meth:`TurboGenerator.frozen_base`, for the teacher-UNet feature
space): the adapters are off while the base runs, but its backward comes later, when they are on
again. A block that gradient checkpointing recomputes in that backward would silently use the
adapted weights, so inside ``frozen_base`` every checkpointed block is recomputed by a function that
turns the adapters off for the recompute too.

**Decoding with gradient** (pixel feature spaces) goes ``decode_chunk`` images at a time; with
gradient checkpointing on, each chunk's VAE activations are recomputed in the backward instead of
kept, so memory holds one chunk's activations rather than the whole batch's.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.utils.checkpoint

# Classes come from the modules that define them: diffusers' top level is a lazy module whose static
# view (what a type checker reads) is the dummy placeholders it uses when torch is missing.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from drpo_core.context import BuildContext
from drpo_core.errors import PluginError
from drpo_core.hub import from_hub_or_cache, resolve_model
from drpo_core.interfaces import Generator

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
}
GENERATOR_NAMES = {"sd": "sd-turbo", "sdxl": "sdxl-turbo"}
#: prompts whose text embeddings are kept (an SDXL prompt takes ~0.3 MB in bf16)
PROMPT_CACHE_SIZE = 256
#: a real CLIP vocabulary has ~49k tokens; below the 256 byte symbols plus two special tokens the
#: tokenizer is the empty fallback transformers returns for missing files when offline
MIN_TOKENIZER_SIZE = 258
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: the official SD-Turbo one-step constants (method.md §6.1): the UNet runs at ``timestep`` on the
#: unscaled noise; x0 = (z - sqrt(1 - abar_999) eps) / sqrt(abar_999), re-projected to t = 0 as
#: sqrt(abar_0) x0 + sqrt(1 - abar_0) eps (SD's scaled-linear schedule, rounded as in the code)
OFFICIAL_ONE_STEP = {"timestep": 999, "sqrt_one_minus_abar_t": 0.9977, "sqrt_abar_t": 0.0683,
                     "sqrt_abar_0": 0.9996, "sqrt_one_minus_abar_0": 0.0292}
OneStep = Literal["pipeline", "official"]
#: what diffusers (on every encode of a long prompt) and transformers (once per tokenizer) log about
#: truncated prompts; the generator says it once itself (see ``TurboGenerator._check_truncation``)
_TRUNCATION_NOTICES = (
    "The following part of your input was truncated because CLIP can only handle sequences",
    "Token indices sequence length is longer than the specified maximum sequence length",
)

_Loaded = TypeVar("_Loaded")


class TurboGenerator(Generator):
    """SD-Turbo (``architecture="sd"``) or SDXL-Turbo (``"sdxl"``) as a one-step generator.

    ``pipe`` is a loaded pipeline already on its device and dtype; :meth:`from_options` loads one.
    """

    export_formats = ("diffusers", "kohya")

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        architecture: str,
        resolution: int = 512,
        lora: bool = True,
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        lora_target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        decode_chunk: int = 4,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        base_model: str = "",
        one_step: OneStep = "pipeline",
    ) -> None:
        if architecture not in PIPELINE_CLASSES:
            raise PluginError(f"unknown architecture {architecture!r}: expected 'sd' or 'sdxl'")
        if one_step not in ("pipeline", "official"):
            raise PluginError(f"one_step must be 'pipeline' or 'official', got {one_step!r}")
        self.one_step = one_step
        self.pipe = pipe
        self.architecture = architecture
        self.resolution = resolution
        self.lora = lora
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.decode_chunk = decode_chunk
        #: the base model as the run's config names it (hub id or path), for model cards
        self.base_model = base_model
        self.unet, self.vae = pipe.unet, pipe.vae
        self._check_unet()
        self._setup_scheduler()
        self._freeze_and_place()
        if vae_slicing:
            self.vae.enable_slicing()
        if vae_tiling:
            self.vae.enable_tiling()

        # the dtype the UNet's base weights run in (LoRA params may be fp32 on top of it)
        self._weight_dtype = self.unet.dtype
        if lora:
            _check_target_modules(self.unet, lora_target_modules)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    # peft annotates lora_alpha as int, but only divides it by r: a float alpha is fine
                    lora_alpha=lora_alpha,  # type: ignore[arg-type]
                    lora_dropout=0.0,
                    init_lora_weights=True,  # B = 0: the adapted UNet starts equal to the base
                    target_modules=list(lora_target_modules),
                )
            )
            # half-precision base weights, fp32 trainable adapters (peft casts activations)
            cast_training_params(self.unet, dtype=torch.float32)
            self._reference_unet = None
            self._tuner_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        else:
            self._reference_unet = copy.deepcopy(self.unet).eval()
            self._tuner_layers = []
            self.unet.requires_grad_(True)
            self.unet.to(torch.float32)  # fp32 master weights for full fine-tuning
            self._weight_dtype = torch.float32
        self._checkpointing = False  # the trainer turns it on (train.gradient_checkpointing)
        if one_step == "official":
            self._check_official_one_step()

        h = resolution // pipe.vae_scale_factor
        self.noise_shape = (self.unet.config.in_channels, h, h)
        self._prompt_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._warned_truncation = False

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_options(cls, options: Any, context: BuildContext, architecture: str) -> TurboGenerator:
        """Load the pipeline named by ``options.model`` and wrap it (see ``drpo_diffusers`` options)."""
        model, is_local = _resolve_model(options.model, context.config_dir)
        if is_local and options.revision is not None:
            raise PluginError(f"revision {options.revision!r}: model {options.model!r} is a local directory, which has "
                              "no revisions (they are for hub ids)")
        load_kw = {"revision": options.revision, "variant": options.variant}
        _check_pipeline_class(model, is_local, architecture, load_kw)
        dtype = _pick_dtype(options.dtype, context)
        pipe = _load_pipeline(model, is_local, architecture, dict(load_kw, dtype=dtype))
        _check_tokenizers(pipe, options.model)
        pipe.to(context.device)
        pipe.set_progress_bar_config(disable=True)
        return cls(
            pipe,
            architecture=architecture,
            resolution=options.resolution,
            lora=options.lora,
            lora_rank=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_target_modules=options.lora_target_modules,
            decode_chunk=options.decode_chunk,
            vae_slicing=options.vae_slicing,
            vae_tiling=options.vae_tiling,
            base_model=options.model,  # as the user wrote it (hub id or path): the model card loads it so
            one_step=getattr(options, "one_step", "pipeline"),
        )

    def _check_unet(self) -> None:
        config = self.unet.config
        if config.time_cond_proj_dim is not None:
            raise PluginError("UNets with a guidance embedding (time_cond_proj_dim, LCM) are not supported")
        if self.resolution % self.pipe.vae_scale_factor:
            raise PluginError(
                f"resolution {self.resolution} is not a multiple of the VAE factor {self.pipe.vae_scale_factor}"
            )

    def _check_official_one_step(self) -> None:
        if self.architecture != "sd":
            raise PluginError("one_step 'official' is SD-Turbo's official conversion; SDXL-Turbo's official code "
                              "follows the pipeline (method.md §6.2)")
        if self._prediction != "epsilon":
            raise PluginError(f"one_step 'official' needs an epsilon-prediction UNet, the scheduler says "
                              f"{self._prediction!r}")

    def _setup_scheduler(self) -> None:
        """Read the one-step constants from the pipeline's own scheduler."""
        scheduler = self.pipe.scheduler
        if not isinstance(scheduler, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)):
            raise PluginError(
                f"scheduler {type(scheduler).__name__} is not supported: Turbo models use "
                "EulerDiscreteScheduler or EulerAncestralDiscreteScheduler with timestep_spacing='trailing'"
            )
        prediction = scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise PluginError(f"scheduler prediction_type {prediction!r} is not supported")
        scheduler.set_timesteps(1, device="cpu")
        if float(scheduler.sigmas[-1]) != 0.0:
            raise PluginError("the scheduler's last sigma is not 0, so one step does not end at x0")
        self.timestep = scheduler.timesteps[0].clone()  # 999 with trailing spacing
        self._sigma = float(scheduler.sigmas[0])
        self._init_sigma = float(scheduler.init_noise_sigma)
        self._prediction = prediction

    def _freeze_and_place(self) -> None:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        # fp16 VAE decoding overflows to NaN for VAEs that ask for upcasting (SDXL's); bf16 is safe
        if self.vae.dtype == torch.float16 and self.vae.config.force_upcast:
            self.vae.to(torch.float32)

    # ------------------------------------------------------------------ Generator interface

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def module(self) -> torch.nn.Module:
        return self.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def sample(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        return self._one_step(self.unet, self._weight_dtype, prompts, noise)

    @torch.no_grad()
    def reference(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        if self._reference_unet is not None:
            return self._one_step(self._reference_unet, self._reference_unet.dtype, prompts, noise)
        self.unet.disable_adapters()
        try:
            return self._one_step(self.unet, self._weight_dtype, prompts, noise)
        finally:
            self.unet.enable_adapters()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # with gradient (pixel feature spaces), checkpointing keeps only one chunk's VAE activations alive
        recompute = self._checkpointing and torch.is_grad_enabled() and latents.requires_grad
        images = []
        for chunk in latents.split(self.decode_chunk):
            if recompute:
                images.append(torch.utils.checkpoint.checkpoint(self._decode_chunk, chunk, use_reentrant=False))
            else:
                images.append(self._decode_chunk(chunk))
        return torch.cat(images)

    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._unscale(latents.to(self.device, torch.float32)).to(self.vae.dtype)
        x = self.vae.decode(z, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = []
        for chunk in images.split(self.decode_chunk):
            x = (chunk.to(self.device, torch.float32) * 2 - 1).to(self.vae.dtype)
            z = self.vae.encode(x).latent_dist.mode()
            latents.append(self._scale(z.float()))
        return torch.cat(latents)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        if self.lora:
            state = get_peft_model_state_dict(self.unet)
        else:
            state = self.unet.state_dict()
        return {key: value.detach().contiguous() for key, value in state.items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = self.trainable_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        resized = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or resized:
            raise PluginError(
                f"checkpoint does not fit this generator: {len(missing)} missing, {len(unexpected)} unexpected, "
                f"{len(resized)} resized keys, e.g. {(missing + unexpected + resized)[0]} "
                "(different LoRA rank, targets or lora setting?)"
            )
        if self.lora:
            set_peft_model_state_dict(self.unet, dict(state))
        else:
            self.unet.load_state_dict(dict(state))

    def train(self, mode: bool = True) -> None:
        self.unet.train(mode)

    def export(self, out_dir: Path, format: str = "diffusers", fuse: bool = False,
               card: Mapping[str, Any] | None = None) -> Path:
        """What `drpo export` calls: see :func:`drpo_diffusers.export.export_generator`."""
        from drpo_diffusers.export import export_generator

        return export_generator(self, out_dir, format=format, fuse=fuse, card=card)

    def enable_gradient_checkpointing(self) -> None:
        # diffusers' default checkpoint function is non-reentrant (use_reentrant=False)
        self.unet.enable_gradient_checkpointing()
        self._checkpointing = True

    # ------------------------------------------------------------------ the frozen base, for feature spaces

    def unet_conditioning(self, prompts: Sequence[str], dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The UNet's text conditioning for ``prompts`` (one row each), as keyword arguments of its forward:
        ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs`` (pooled text embeddings and the time
        ids ``[r, r, 0, 0, r, r]`` of the resolution r). Cast to ``dtype`` (default: the UNet's)."""
        dtype = dtype or self._weight_dtype
        cond = self._conditioning(prompts)
        added = None
        if "text_embeds" in cond:
            added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return {"encoder_hidden_states": cond["hidden"].to(dtype), "added_cond_kwargs": added}

    @contextmanager
    def frozen_base(self, checkpointing: bool = True) -> Iterator[torch.nn.Module]:
        """The frozen base UNet, to run *with* gradient w.r.t. its input (the teacher-UNet feature space).

        With LoRA it is the generator's own UNet with its adapters off until the context exits; with full
        fine-tuning, the reference copy. Its base weights never require grad. Its backward runs after the
        context has exited: with ``checkpointing`` every block the UNet checkpoints is recomputed then by a
        function that turns the adapters off for the recompute as well (non-reentrant
        ``torch.utils.checkpoint``), so the gradient is the base's; without, nothing is checkpointed
        (every activation is kept: exact too, but much more memory). The generator's own checkpointing
        setting is restored on exit.
        """
        unet = self._reference_unet if self._reference_unet is not None else self.unet
        if checkpointing:
            unet.enable_gradient_checkpointing(self._base_checkpoint)
        else:
            unet.disable_gradient_checkpointing()
        adapters_were_on = self._adapters_on()
        self._set_adapters(False)
        try:
            yield unet
        finally:
            self._set_adapters(adapters_were_on)
            if unet is self.unet and self._checkpointing:
                unet.enable_gradient_checkpointing()  # the generator's own (default) checkpoint function
            else:
                unet.disable_gradient_checkpointing()

    def _base_checkpoint(self, module: Callable[..., Any], *args: Any) -> Any:
        """diffusers' gradient checkpointing function inside ``frozen_base``: the recompute in the backward
        (when the adapters are on again) runs the block with the adapters off, as its forward did."""

        # only the block's own LoRA layers matter to its recompute (a ResNet block has none)
        inside = module.modules() if isinstance(module, torch.nn.Module) else self._tuner_layers
        layers = [m for m in inside if isinstance(m, BaseTunerLayer)]

        def run(*inputs: Any) -> Any:
            switched = [layer for layer in layers if not layer.disable_adapters]  # none in the forward
            for layer in switched:
                layer.enable_adapters(False)
            try:
                return module(*inputs)
            finally:
                for layer in switched:
                    layer.enable_adapters(True)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    def _adapters_on(self) -> bool:
        return bool(self._tuner_layers) and not self._tuner_layers[0].disable_adapters

    def _set_adapters(self, enabled: bool) -> None:
        """Switch every LoRA layer (what ``unet.enable_adapters`` / ``disable_adapters`` do, without walking
        the whole module tree on every recomputed block)."""
        if self._tuner_layers and self._adapters_on() != enabled:
            for layer in self._tuner_layers:
                layer.enable_adapters(enabled)

    # ------------------------------------------------------------------ one-step math

    def _one_step(
        self, unet: Any, dtype: torch.dtype, prompts: Sequence[str], noise: torch.Tensor
    ) -> torch.Tensor:
        if len(prompts) != noise.shape[0]:
            raise PluginError(f"{len(prompts)} prompts for {noise.shape[0]} noise samples")
        cond = self.unet_conditioning(prompts, dtype)
        if self.one_step == "official":
            return self._official_one_step(unet, dtype, noise, cond)
        sample = noise.to(self.device, torch.float32) * self._init_sigma
        unet_input = sample / math.sqrt(self._sigma**2 + 1)  # scale_model_input
        out = unet(unet_input.to(dtype), self.timestep.to(self.device), **cond, return_dict=False)[0].float()
        sigma = self._sigma
        if self._prediction == "epsilon":
            return sample - sigma * out
        if self._prediction == "v_prediction":
            return out * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
        return out

    def _official_one_step(self, unet: Any, dtype: torch.dtype, noise: torch.Tensor,
                           cond: dict[str, Any]) -> torch.Tensor:
        """The official SD-Turbo conversion (module docstring): unscaled noise in, x0 re-projected to t = 0."""
        c = OFFICIAL_ONE_STEP
        z = noise.to(self.device, torch.float32)
        timestep = torch.tensor(c["timestep"], device=self.device)
        eps = unet(z.to(dtype), timestep, **cond, return_dict=False)[0].float()
        x0 = (z - c["sqrt_one_minus_abar_t"] * eps) / c["sqrt_abar_t"]
        return c["sqrt_abar_0"] * x0 + c["sqrt_one_minus_abar_0"] * eps

    @torch.no_grad()
    def _conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-prompt text conditioning, stacked for the batch; encoded once per prompt and cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            for prompt, cond in zip(missing, self._encode_prompts(missing), strict=True):
                self._prompt_cache[prompt] = cond
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        batch = {
            key: torch.stack([self._prompt_cache[p][key] for p in prompts])
            for key in self._prompt_cache[prompts[0]]
        }
        while len(self._prompt_cache) > max(PROMPT_CACHE_SIZE, len(set(prompts))):
            self._prompt_cache.popitem(last=False)
        return batch

    def _encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        self._check_truncation(prompts)
        kw = dict(device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        with _without_notices(type(self.pipe).__module__, _TRUNCATION_NOTICES):
            encoded = self.pipe.encode_prompt(prompts, **kw)
        if self.architecture == "sd":
            hidden, _ = encoded
            return [{"hidden": h} for h in hidden]
        hidden, _, pooled, _ = encoded
        # SDXL micro-conditioning: original size, crop top-left, target size
        r = float(self.resolution)
        time_ids = torch.tensor([r, r, 0.0, 0.0, r, r], device=self.device)
        return [
            {"hidden": h, "text_embeds": p, "time_ids": time_ids} for h, p in zip(hidden, pooled, strict=True)
        ]

    def _check_truncation(self, prompts: Sequence[str]) -> None:
        """Warn once per generator (once per run) when a text encoder reads only the start of a prompt.

        The pipeline truncates prompts to the tokenizer's ``model_max_length`` (77 tokens for CLIP);
        diffusers logs the dropped text on every encode, which :meth:`_encode_prompts` silences.
        """
        if self._warned_truncation:
            return
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(self.pipe, name, None)
            if tokenizer is None:
                continue
            limit = tokenizer.model_max_length
            lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids]
            long = [(n, p) for n, p in zip(lengths, prompts, strict=True) if n > limit]
            if not long:
                continue
            n, prompt = max(long)
            example = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warnings.warn(
                f"prompts longer than the {limit} tokens the text encoder reads are truncated: {example!r} loses "
                f"{n - limit} of its {n} tokens ({len(long)} of the {len(prompts)} prompts encoded now are too "
                "long; said once per run, later truncated prompts are not reported)", stacklevel=2)
            self._warned_truncation = True
            return

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled (UNet-space) latents to the VAE's latent space, as the pipelines do."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(std, device=latents.device).view(1, -1, 1, 1)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(std, device=latents.device).view(1, -1, 1, 1)
            return (latents - mean) * config.scaling_factor / std
        return latents * config.scaling_factor


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def _without_notices(pipeline_module: str, prefixes: Sequence[str]) -> Iterator[None]:
    """Drop the log records starting with ``prefixes`` from the pipeline's and the tokenizers' loggers,
    while inside: the truncation notices only, every other message passes."""
    drop = _DropMessages(prefixes)
    loggers = [logging.getLogger(pipeline_module), logging.getLogger("transformers.tokenization_utils_base")]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


# ---------------------------------------------------------------------- loading and checks


def _resolve_model(model: str, config_dir: Path) -> tuple[str, bool]:
    """``(model, is_local)``: a diffusers pipeline directory (relative to the config's directory) or a hub id."""
    resolved, is_local = resolve_model(model, config_dir)
    if is_local and not (Path(resolved) / "model_index.json").is_file():
        raise PluginError(f"model {model!r} is not a diffusers pipeline directory (no model_index.json)")
    return resolved, is_local


def _check_pipeline_class(model: str, is_local: bool, architecture: str, load_kw: dict[str, Any]) -> None:
    config: dict[str, Any] = from_hub_or_cache(
        # diffusers annotates load_config as returning a pair, which it does with return_unused_kwargs only
        DiffusionPipeline.load_config, model, is_local, {"revision": load_kw["revision"]}  # type: ignore[arg-type]
    )
    found, expected = config.get("_class_name"), PIPELINE_CLASSES[architecture].__name__
    if found == expected:
        return
    hint = ""
    for other, cls in PIPELINE_CLASSES.items():
        if cls.__name__ == found:
            hint = f"; use the {GENERATOR_NAMES[other]} generator"
    raise PluginError(
        f"model {model!r} is a {found}, but the {GENERATOR_NAMES[architecture]} generator needs a {expected}{hint}"
    )


def _load_pipeline(model: str, is_local: bool, architecture: str, kwargs: dict[str, Any]) -> DiffusionPipeline:
    cls = PIPELINE_CLASSES[architecture]
    if architecture == "sd":
        # the safety checker is not needed for training and costs memory
        kwargs = dict(kwargs, safety_checker=None, requires_safety_checker=False)
    return from_hub_or_cache(cls.from_pretrained, model, is_local, kwargs)


def _check_tokenizers(pipe: DiffusionPipeline, model: str) -> None:
    """Catch the silent offline fallback: a tokenizer with (almost) no vocabulary."""
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    for tok_name, enc_name in pairs:
        tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tokenizer is None or encoder is None:
            continue
        size, limit = len(tokenizer), encoder.config.vocab_size
        if size < MIN_TOKENIZER_SIZE or size > limit:
            raise PluginError(
                f"model {model!r}: {tok_name} has {size} tokens but its text encoder expects up to {limit} "
                "(missing or broken tokenizer files?)"
            )


def _check_target_modules(unet: torch.nn.Module, targets: Sequence[str]) -> None:
    """Every LoRA target must name at least one Linear/Conv layer (peft only checks the union)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise PluginError(f"LoRA target module {target!r} matches no Linear/Conv layer of the UNet")


def _pick_dtype(choice: str, context: BuildContext) -> torch.dtype:
    """``auto``: the run's mixed precision on CUDA, fp32 elsewhere."""
    if choice != "auto":
        return _DTYPES[choice]
    if torch.device(context.device).type == "cuda":
        return _DTYPES.get(context.mixed_precision, torch.float32)
    return torch.float32
