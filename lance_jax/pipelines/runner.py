"""`LanceRunner`: loads a converted checkpoint once and runs every task (see the package docstring)."""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Sequence

import jax
import numpy as np

from lance_jax import media, vision
from lance_jax.pipelines.requests import (
    DEFAULT_CONTEXT_BUDGET, DEFAULT_FRAMES, DEFAULT_SIZE, GenerationResult, GenerationSettings, InferenceError,
    NEEDS_VAE, NEEDS_VIT, NOISE_SEED, Request, TASKS, TextResult, TextSettings, _Timer, _load_media, _seed,
    floor_frames, latent_frames, parse_mesh, resolve_resolution,
)


# ----------------------------------------------------------------------------------------------
# Jitted pieces
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "rows", "capacity"))
def prefill_cache(model, params, batch, *, rows: int, capacity: int):
    """KV cache of a context chunk (the cache is allocated inside the computation)."""
    from lance_jax.models.backbone import KVCache
    from lance_jax.models.lance import Lance

    cache = KVCache.empty(model.cfg, rows, capacity)
    _, _, cache = model.apply({"params": params}, batch, cache, method=Lance.extend)
    return cache


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


class LanceRunner:
    """A converted checkpoint loaded once; runs any task.

    ckpt: a `convert_weights.py to-jax` folder. dtype: compute dtype of the LLM, ViT and VAE
    ('float32' / 'bfloat16'; default: the checkpoint config's). param_dtype: cast params to it (default
    as stored). mesh: {'fsdp': 4, 'tensor': 2} or 'fsdp=4,tensor=2': the LLM params are sharded with
    the logical-axis rules, the CFG branches ride the batch axis. vit_path / vae_path: use these
    reference weights instead of (or in the absence of) the checkpoint's items. max_context: the
    longest sequence allowed (default: llm_config.json max_position_embeddings).
    """

    def __init__(self, ckpt: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None,
                 vit_path: str | None = None, vae_path: str | None = None, max_context: int | None = None,
                 progress: bool = True):
        from lance_jax.models.lance import Lance
        from lance_jax.pipelines import loading

        t0 = time.perf_counter()
        self.ckpt = os.fspath(ckpt)
        self.manifest, self.cfg = loading.model_config(self.ckpt, dtype)
        self.dtype = self.cfg.dtype
        self.tokenizer = loading.tokenizer(self.ckpt)
        self.max_context = int(max_context or loading.llm_json(self.ckpt).get("max_position_embeddings")
                               or DEFAULT_CONTEXT_BUDGET)
        self.progress = progress
        self.model = Lance(self.cfg)
        self.mesh_shape = parse_mesh(mesh)
        self.mesh, params = loading.restored_params(self.ckpt, self.cfg, self.mesh_shape)
        self.params = loading.cast_params(params["lance"], param_dtype)
        self.vit_cfg, self.vit_params = loading.vit(self.manifest, params.get("vit"), vit_path, self.dtype, param_dtype)
        self.vae_cfg, self.vae_params = loading.autoencoder(self.ckpt, self.cfg, self.manifest, params.get("vae"),
                                                            vae_path, param_dtype)
        self.load_seconds = round(time.perf_counter() - t0, 3)

    @property
    def has_vit(self) -> bool:
        return self.vit_params is not None

    @property
    def has_vae(self) -> bool:
        return self.vae_params is not None

    def describe(self) -> dict:
        return dict(ckpt=os.path.abspath(self.ckpt), items=self.manifest.get("items"), dtype=self.dtype,
                    vit=self.has_vit, vae=self.has_vae, mesh=self.mesh_shape, max_context=self.max_context,
                    num_layers=self.cfg.num_layers, hidden_size=self.cfg.hidden_size,
                    max_latent_size=self.cfg.max_latent_size, max_latent_frames=self.cfg.max_latent_frames,
                    load_seconds=self.load_seconds)

    def _mesh_ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        from lance_jax import sharding

        return sharding.use_mesh(self.mesh)

    def _place_batch(self, batch: dict) -> dict:
        """Under a mesh, put the CFG branches (leading batch axis) on the data/fsdp axes where they divide."""
        if self.mesh is None:
            return batch
        from lance_jax import sharding

        rows = next(iter(batch.values())).shape[0]
        return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, np.ndim(v), rows)) for k, v in batch.items()}

    # -- validation -----------------------------------------------------------------------------------
    def require(self, task: str) -> None:
        """The checkpoint holds what `task` needs."""
        if task not in TASKS:
            raise InferenceError(f"unknown task {task!r}; expected one of {TASKS}")
        missing = []
        if task in NEEDS_VIT and not self.has_vit:
            missing.append("the ViT (vision tower)")
        if task in NEEDS_VAE and not self.has_vae:
            missing.append("the VAE")
        if missing:
            raise InferenceError(f"checkpoint {self.ckpt} lacks {' and '.join(missing)}, which task {task!r} needs "
                                 f"(items: {self.manifest.get('items')}); convert it with --vit/--vae or pass "
                                 f"vit_path/vae_path")

    def check_latent_grid(self, grid, what: str) -> None:
        t, h, w = grid
        cfg = self.cfg
        if min(grid) < 1:
            raise InferenceError(f"{what}: latent grid {grid} is empty (sides must be >= {cfg.latent_stride} px)")
        if h > cfg.max_latent_size or w > cfg.max_latent_size:
            raise InferenceError(f"{what}: latent grid {h}x{w} exceeds the checkpoint's {cfg.max_latent_size}x"
                                 f"{cfg.max_latent_size} latent position table (at most {cfg.latent_stride * cfg.max_latent_size} px "
                                 f"per side)")
        if t > cfg.max_latent_frames:
            raise InferenceError(f"{what}: {t} latent frames ({4 * (t - 1) + 1} pixel frames) exceed the checkpoint's "
                                 f"{cfg.max_latent_frames} (max_num_frames {cfg.max_num_frames}); use fewer frames or "
                                 f"a video checkpoint")

    def check_length(self, n_tokens: int, what: str) -> None:
        if n_tokens > self.max_context:
            raise InferenceError(f"{what}: the sequence has {n_tokens} tokens, over the context budget of "
                                 f"{self.max_context}; shorten the prompt or use smaller media")

    def _text(self, text, what: str, *, required: bool = True) -> str:
        if text is None or (isinstance(text, str) and not text.strip()):
            if required:
                raise InferenceError(f"missing {what}")
            return ""
        if not isinstance(text, str):
            raise InferenceError(f"{what} must be a string, got {type(text).__name__}")
        return text.strip()

    # -- host-side preparation ---------------------------------------------------------------------------
    def _build(self, fn, *args, **kw):
        try:
            return fn(*args, tokenizer=self.tokenizer, cfg=self.cfg, **kw)
        except (ValueError, TypeError) as err:
            raise InferenceError(str(err)) from None

    def _vae_frames(self, frames: np.ndarray, side: int) -> np.ndarray:
        """uint8 frames -> VAE input (3, F, H, W) in [-1, 1] at the bucket of `side` (F kept 4k+1)."""
        try:
            return vision.vae_pixels(frames, side)
        except ValueError as err:
            raise InferenceError(f"cannot resize the input: {err}") from None

    def _vit_inputs(self, frames: np.ndarray, side: int):
        try:
            return vision.vit_inputs(frames, side)
        except ValueError as err:
            raise InferenceError(f"cannot preprocess the input for the ViT: {err}") from None

    # -- device stages -----------------------------------------------------------------------------------
    def _vit(self, patches, grid) -> np.ndarray:
        from lance_jax.models.vit import encode

        return np.asarray(jax.block_until_ready(encode(self.vit_params, patches, grid, self.vit_cfg)), np.float32)

    def _vae_encode(self, pixels: np.ndarray, settings: GenerationSettings) -> np.ndarray:
        """(3, F, H, W) -> (t, h, w, 48) latent (posterior sample with posterior_seed, or the mean)."""
        from lance_jax.models import autoencoder

        key = jax.random.PRNGKey(settings.posterior_seed) if settings.sample_posterior else None
        z = autoencoder.encode_latent(self.vae_params, pixels, self.vae_cfg, key)
        return np.array(jax.block_until_ready(z), np.float32)

    def _vae_decode(self, latent: np.ndarray) -> np.ndarray:
        from lance_jax.models import autoencoder

        return np.asarray(jax.block_until_ready(autoencoder.decode(self.vae_params, latent, self.vae_cfg)),
                          np.float32)

    def _latent_grid(self, frames: int, pixels: np.ndarray) -> tuple[int, int, int]:
        """(t, h, w) latent tokens of `frames` pixel frames at the size of pixels (3, F, H, W)."""
        stride = self.cfg.latent_stride
        return latent_frames(frames), pixels.shape[2] // stride, pixels.shape[3] // stride

    def _noise(self, seed: int, rows: int) -> np.ndarray:
        """Initial state rows N(0, 1), float32, from NumPy's PCG64 seeded with `seed` (host side, platform-exact)."""
        return np.random.default_rng(seed).standard_normal((rows, self.cfg.patch_latent_dim), dtype=np.float32)

    # -- generation core --------------------------------------------------------------------------------
    def _generate(self, task: str, caption: str, target_grid, *, seeds: Sequence[int], settings: GenerationSettings,
                  timer: _Timer, vit=None, source_pixels=None, first_frame_pixels=None, info: dict,
                  progress: bool | None = None) -> list[GenerationResult]:
        """Shared body of every generation task. vit: (patches, grid) of the edit source; source_pixels:
        the edit source's VAE input; first_frame_pixels: the i2v first frame's VAE input."""
        from lance_jax.sampling import cfg_active, schedule

        settings.validate()
        progress = self.progress if progress is None else progress
        built, target_grid, n_source = self._generation_layout(task, caption, target_grid, vit, source_pixels,
                                                               timer, info)
        vit_embeds, cond_rows, clean = self._conditions(vit, source_pixels, first_frame_pixels, settings, timer,
                                                        n_source + int(np.prod(target_grid)))
        times = schedule(int(settings.steps), float(settings.shift))
        cfg_opts = settings.cfg()
        shared = dict(timer.times)  # read / build / vit / vae_encode: once per request
        denoised, cache = [], None
        for seed in seeds:
            sample_timer = _Timer()
            rows = self._noise(seed, len(clean))  # reference: one noise row per VAE token
            if cond_rows is not None:
                rows[: len(cond_rows)] = cond_rows
            final, cache = self._denoised(built, rows, clean, vit_embeds, times, cfg_opts, settings, cache,
                                          sample_timer, progress)
            denoised.append((final.reshape(*target_grid, -1), sample_timer))
        del cache  # the KV caches are not needed by the VAE decode
        guided = int(cfg_active(times[:-1], cfg_opts.interval, cfg_opts.scale).sum())
        posterior_seed = int(settings.posterior_seed) if (vit is not None or first_frame_pixels is not None) else None
        results = []
        for k, (seed, (latent, sample_timer)) in enumerate(zip(seeds, denoised)):
            with sample_timer("vae_decode"):
                frames = media.to_uint8(self._vae_decode(latent))
            timings = dict(shared, **sample_timer.times)
            timings["denoise_per_step"] = round(timings["denoise"] / int(settings.steps), 5)
            sample_info = dict(info, sample=k, seed=int(seed), noise_seed=int(seed), posterior_seed=posterior_seed,
                               guided_steps=guided, timings=timings)
            results.append(GenerationResult(frames, latent, sample_info))
        return results

    def _generation_layout(self, task: str, caption: str, target_grid, vit, source_pixels, timer: _Timer,
                           info: dict):
        """(built sequence, target latent grid (t, h, w), number of source latents); records the token counts
        and output size in `info`. Grids and the sequence length are checked against the model's limits."""
        from lance_jax.sequence import build_generation

        stride = self.cfg.latent_stride
        target_grid = tuple(int(x) for x in target_grid)
        self.check_latent_grid(target_grid, f"{task} target")
        kw, src_grid = {}, None
        if vit is not None:
            _, frames, height, width = source_pixels.shape
            src_grid = (latent_frames(frames), height // stride, width // stride)
            self.check_latent_grid(src_grid, f"{task} source")
            kw = dict(source_vit_grid=tuple(int(x) for x in vit[1][0]), source_latent_grid=src_grid)
        with timer("build"):
            built = self._build(build_generation, task, caption, target_latent_grid=target_grid, **kw)
        n_tokens = built.num_tokens
        self.check_length(n_tokens, task)
        t, h, w = target_grid
        n_source = int(np.prod(src_grid)) if src_grid else 0
        span = built.caption_span
        info.update(tokens=dict(total=n_tokens, target=t * h * w, source_vae=n_source,
                                vit=int(built.vision_blocks[0]["num_tokens"]) if vit is not None else 0,
                                caption=int(span[1] - span[0]) if span else 0),
                    latent_grid=list(target_grid), frames=4 * (t - 1) + 1, height=stride * h, width=stride * w)
        return built, target_grid, n_source

    def _conditions(self, vit, source_pixels, first_frame_pixels, settings: GenerationSettings, timer: _Timer,
                    n_rows: int):
        """(ViT embeddings of the edit source or None, clean latent rows of the conditions or None, bool (n_rows,)
        marking the rows that stay clean). Host -> device -> host arrays, so that no stage pins another's
        devices."""
        from lance_jax import packing

        vit_embeds, cond_rows, clean = None, None, np.zeros(n_rows, bool)
        if vit is not None:
            with timer("vit"):
                vit_embeds = self._vit(*vit)
            with timer("vae_encode"):
                cond_rows = packing.latent_tokens(self._vae_encode(source_pixels, settings),
                                                   self.cfg.latent_patch_size)
        if first_frame_pixels is not None:
            with timer("vae_encode"):
                first = self._vae_encode(first_frame_pixels, settings)
            cond_rows = packing.latent_tokens(first, self.cfg.latent_patch_size)
            clean[: len(cond_rows)] = True
        return vit_embeds, cond_rows, clean

    def _denoised(self, built, rows: np.ndarray, clean: np.ndarray, vit_embeds, times, cfg_opts,
                  settings: GenerationSettings, cache, timer: _Timer, progress: bool):
        """(float32 (n_target, C) denoised target rows, the context's KV cache). rows: (n_rows, C) initial state
        (noise, conditions written in); the cache is prefilled on the first call and reused after, since the
        contexts do not depend on the noise."""
        from lance_jax.kv_plan import plan_generation
        from lance_jax.sampling import denoise

        with timer("plan"):
            plan = plan_generation(built.layout, self.cfg, rows, clean, text_cfg=cfg_opts.scale > 1.0,
                                   kv_position_quirk=settings.kv_position_quirk)
        with self._mesh_ctx():
            if cache is None:
                context = dict(plan.context)
                rows_b = context["und_ids"].shape[0]
                if vit_embeds is not None:
                    context["vit_embeds"] = np.repeat(vit_embeds[None], rows_b, axis=0)
                capacity = context["und_ids"].shape[1] + context["latents"].shape[1]
                with timer("prefill"):
                    cache = jax.block_until_ready(prefill_cache(self.model, self.params, self._place_batch(context),
                                                                rows=rows_b, capacity=capacity))
                del context
            query = self._place_batch(dict(plan.query))
            with timer("denoise"):
                final, _ = denoise(self.model, self.params, query, cache, plan.query["latents"][0], plan.noisy,
                                   times, cfg_opts, progress=progress)
                final = np.asarray(jax.block_until_ready(final), np.float32)
        return final[: len(plan.target_vae_rows)], cache

    # -- public tasks ---------------------------------------------------------------------------------------
    def _seeds(self, seed, num_samples: int) -> list[int]:
        if int(num_samples) < 1:
            raise InferenceError(f"num_samples must be >= 1, got {num_samples}")
        base = _seed(seed)
        return [base + k for k in range(int(num_samples))]

    def t2i(self, prompt: str, *, height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1], seed: int = NOISE_SEED,
            num_samples: int = 1, settings: GenerationSettings = GenerationSettings(), progress=None):
        return self._text_to_visual("t2i", prompt, height, width, 1, seed, num_samples, settings, progress)

    def t2v(self, prompt: str, *, height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1],
            frames: int = DEFAULT_FRAMES, seed: int = NOISE_SEED, num_samples: int = 1,
            settings: GenerationSettings = GenerationSettings(), progress=None):
        return self._text_to_visual("t2v", prompt, height, width, frames, seed, num_samples, settings, progress)

    def _text_to_visual(self, task, prompt, height, width, frames, seed, num_samples, settings, progress):
        self.require(task)
        caption = self._text(prompt, f"{task} prompt")
        height, width = int(height), int(width)
        if height < 16 or width < 16:
            raise InferenceError(f"{task}: size {height}x{width} is below 16 px")
        frames = floor_frames(frames)
        grid = (latent_frames(frames), height // self.cfg.latent_stride, width // self.cfg.latent_stride)
        info = dict(task=task, prompt=caption, requested=dict(height=height, width=width, frames=frames))
        out = self._generate(task, caption, grid, seeds=self._seeds(seed, num_samples), settings=settings,
                             timer=_Timer(), info=info, progress=progress)
        return out if num_samples > 1 else out[0]

    def i2v(self, prompt: str, image, *, frames: int = DEFAULT_FRAMES, resolution=None, seed: int = NOISE_SEED,
            num_samples: int = 1, settings: GenerationSettings = GenerationSettings(), progress=None):
        self.require("i2v")
        caption = self._text(prompt, "i2v prompt")
        res = resolve_resolution(resolution, "i2v")
        timer = _Timer()
        with timer("read"):
            src, src_info = _load_media(image, "image", settings)
            pixels = self._vae_frames(src, res.vae_side)  # (3, 1, H, W)
        frames = floor_frames(frames)
        grid = self._latent_grid(frames, pixels)
        info = dict(task="i2v", prompt=caption, resolution=res.name, source=src_info)
        out = self._generate("i2v", caption, grid, seeds=self._seeds(seed, num_samples), settings=settings,
                             timer=timer, first_frame_pixels=pixels, info=info, progress=progress)
        return out if num_samples > 1 else out[0]

    def image_edit(self, instruction: str, image, *, resolution=None, seed: int = NOISE_SEED, num_samples: int = 1,
                   settings: GenerationSettings = GenerationSettings(), progress=None):
        return self._edit("image_edit", instruction, image, resolution, seed, num_samples, settings, progress)

    def video_edit(self, instruction: str, video, *, resolution=None, seed: int = NOISE_SEED, num_samples: int = 1,
                   settings: GenerationSettings = GenerationSettings(), progress=None):
        return self._edit("video_edit", instruction, video, resolution, seed, num_samples, settings, progress)

    def _edit(self, task, instruction, source, resolution, seed, num_samples, settings, progress, *, info_extra=None):
        self.require(task)
        caption = self._text(instruction, f"{task} instruction")
        res = resolve_resolution(resolution, task)
        kind = "video" if task == "video_edit" else "image"
        timer = _Timer()
        with timer("read"):
            src, src_info = _load_media(source, kind, settings)
            src = src[: floor_frames(len(src))]
            pixels = self._vae_frames(src, res.vae_side)
            vit = self._vit_inputs(src, res.vit_side)
        grid = self._latent_grid(pixels.shape[1], pixels)
        info = dict(task=task, prompt=caption, resolution=res.name, source=src_info, vit_grid=vit[1][0].tolist(),
                    **(info_extra or {}))
        out = self._generate(task, caption, grid, seeds=self._seeds(seed, num_samples), settings=settings,
                             timer=timer, vit=vit, source_pixels=pixels, info=info, progress=progress)
        return out if num_samples > 1 else out[0]

    def multi_edit(self, instructions: Sequence[str], source, *, kind: str | None = None, resolution=None,
                   seed: int = NOISE_SEED, settings: GenerationSettings = GenerationSettings(), progress=None):
        """Chained single-turn edits (30 §7.6): turn i edits turn i-1's output (turn 0 edits `source`).

        kind: 'image' or 'video' (default: from the path's extension / the array's frame count).
        Every turn uses the same seed (the reference's per-sample noise rule)."""
        self.require("multi_edit")
        if isinstance(instructions, str) or not instructions:
            raise InferenceError("multi_edit needs a list of one or more instructions (one per turn)")
        if kind is None:
            if isinstance(source, (str, os.PathLike)):
                kind = "video" if os.fspath(source).lower().endswith(media.VIDEO_EXTENSIONS[:-1]) else "image"
            else:
                kind = "image" if np.ndim(source) == 3 or len(source) == 1 else "video"
        if kind not in ("image", "video"):
            raise InferenceError(f"multi_edit source kind {kind!r} must be image or video")
        texts = [self._text(x, f"multi_edit instruction {i + 1}") for i, x in enumerate(instructions)]
        task = "video_edit" if kind == "video" else "image_edit"
        results, current = [], source
        for i, text in enumerate(texts):
            res = self._edit(task, text, current, resolution, seed, 1, settings, progress,
                             info_extra=dict(turn=i + 1, turns=len(texts), edit_task=task))
            res.info["task"] = "multi_edit"
            results.append(res)
            current = res.frames if kind == "video" else res.frames[0]
        return results

    def x2t_image(self, question: str | None, image, *, resolution=None, system_prompt: str | None = None,
                  text: TextSettings = TextSettings(), seed: int = NOISE_SEED):
        return self._understand("x2t_image", question, image, resolution, system_prompt, text, seed)

    def x2t_video(self, question: str | None, video, *, resolution=None, system_prompt: str | None = None,
                  text: TextSettings = TextSettings(), seed: int = NOISE_SEED,
                  settings: GenerationSettings = GenerationSettings()):
        return self._understand("x2t_video", question, video, resolution, system_prompt, text, seed, settings)

    def _understand(self, task, question, source, resolution, system_prompt, text: TextSettings, seed,
                    settings: GenerationSettings = GenerationSettings()) -> TextResult:
        from lance_jax.kv_plan import plan_understanding
        from lance_jax.sampling import decode
        from lance_jax.sequence import (GRADIO_X2T_IMAGE_INSTRUCTION, GRADIO_X2T_VIDEO_INSTRUCTION,
                                        build_understanding)

        self.require(task)
        text.validate()
        question = self._text(question, f"{task} question", required=False)
        kind = "video" if task == "x2t_video" else "image"
        default = GRADIO_X2T_VIDEO_INSTRUCTION if kind == "video" else GRADIO_X2T_IMAGE_INSTRUCTION
        instruction = system_prompt or default
        res = resolve_resolution(resolution, task)
        timer = _Timer()
        with timer("read"):
            src, src_info = _load_media(source, kind, settings)
            patches, grid = self._vit_inputs(src, res.vit_side)
        with timer("build"):
            built = self._build(build_understanding, task, question, vit_grid=tuple(int(x) for x in grid[0]),
                                instruction=instruction)
        max_new = int(text.max_new_tokens)
        self.check_length(built.num_tokens + max_new, f"{task} (prompt + {max_new} new tokens)")
        with timer("plan"):
            try:
                plan = plan_understanding(built.layout, self.cfg, max_new, shift=text.training_positions)
            except ValueError as err:
                raise InferenceError(str(err)) from None
        with timer("vit"):
            vit_embeds = self._vit(patches, grid)
        batch = dict(plan.prefill, vit_embeds=vit_embeds[None])
        capacity = batch["und_ids"].shape[1] + batch["latents"].shape[1] + max_new
        seed = _seed(seed)
        with self._mesh_ctx():
            with timer("prefill"):
                cache = jax.block_until_ready(prefill_cache(self.model, self.params, self._place_batch(batch), rows=1,
                                                       capacity=capacity))
            with timer("decode"):
                ids, count, _ = decode(self.model, self.params, cache, plan.first_token, plan.decode_positions,
                                       plan.order0, plan.split0, jax.random.PRNGKey(seed), max_new_tokens=max_new,
                                       vocab_eff=int(min(self.cfg.vocab_size_eff, len(self.tokenizer))),
                                       eos_id=int(self.cfg.eos_token_id), temperature=float(text.temperature or 1.0),
                                       top_p=float(text.top_p), greedy=text.greedy)
                count = int(count)
                ids = np.asarray(ids)[:count]
        raw = self.tokenizer.decode(ids.tolist())
        answer = raw.replace(self.tokenizer.id_to_token(self.cfg.eos_token_id), "").strip()
        timer.times["decode_per_token"] = round(timer.times["decode"] / max(count, 1), 5)
        info = dict(task=task, question=question, system_prompt=instruction, resolution=res.name, source=src_info,
                    vit_grid=grid[0].tolist(), seed=seed, new_tokens=count,
                    stopped=bool(count and ids[-1] == self.cfg.eos_token_id),
                    tokens=dict(prompt=built.num_tokens, vit=int(built.vision_blocks[0]["num_tokens"])),
                    timings=dict(timer.times))
        return TextResult(raw, answer, ids, info)

    # -- requests -> files -----------------------------------------------------------------------------------
    def run(self, request: Request, out_dir: str, *, settings: GenerationSettings = GenerationSettings(),
            text: TextSettings = TextSettings(), progress=None) -> dict:
        """Run one request, write its files under out_dir, return its JSON record (`records.run_request`)."""
        from lance_jax.pipelines.records import run_request

        return run_request(self, request, out_dir, settings=settings, text=text, progress=progress)
