"""Every Lance task end to end from a converted checkpoint (spec 30 §2-§12): the engine behind `infer.py`.

    runner = LanceRunner("ckpt/")                                  # config, tokenizer, params, ViT, VAE: once
    img = runner.t2i("A red cat sits.", height=768, width=768, seed=42)        # GenerationResult
    clip = runner.video_edit("Make it red.", "in.mp4")                         # GenerationResult
    ans = runner.x2t_image("What is this?", "cat.png")                         # TextResult
    turns = runner.multi_edit(["Add a hat.", "Make it night."], "cat.png")     # [GenerationResult]
    record = runner.run(Request(task="t2i", prompt="..."), out_dir="out/")     # writes files, returns JSON

Generation (t2i, t2v, i2v, image_edit, video_edit): media are bucket-resized at the resolution preset,
edit sources go through the ViT and the VAE (posterior sample, seeded), the sample is built
(`sequence.build_generation`), the conditional and caption-free contexts are prefilled once
(`kv_plan.plan_generation`, reference KV-cache semantics incl. its CFG position quirk), the target is
integrated with the shifted Euler schedule and text CFG (`sampling.denoise`), then VAE-decoded.
Understanding (x2t_image, x2t_video): ViT, prefill, greedy (or temperature / top-p) decoding, detokenise.
Multi-turn editing chains single-turn edits (30 §7.6): each turn's output is the next turn's source.

Every check that can fail is done before any device compute: task, inputs, sizes against the
checkpoint's latent position table, sequence length against the context budget, and whether the
checkpoint holds the ViT / VAE the task needs. Failures raise `InferenceError` with one clear message.
Seeds: the initial noise uses `seed` (+k for the k-th sample of a request), VAE posterior sampling and
the random caption instruction use `posterior_seed` (the reference's global seed 2025); all are recorded.
"""
from lance_jax.pipelines.records import default_out_dir, read_input_file, request_from_record, write_run_files
from lance_jax.pipelines.requests import (DEFAULT_FRAMES, DEFAULT_RESOLUTION, DEFAULT_SIZE, EDIT_TASKS, GENERATION_TASKS,
                                          NEEDS_VAE, NEEDS_VIT, RESOLUTION_PRESETS, TASKS, UNDERSTANDING_TASKS,
                                          GenerationResult, GenerationSettings, InferenceError, Request, Resolution,
                                          TextResult, TextSettings, check_request, parse_mesh, resolve_resolution)
from lance_jax.pipelines.runner import LanceRunner

__all__ = [
    "LanceRunner", "Request", "GenerationSettings", "TextSettings", "GenerationResult", "TextResult", "InferenceError",
    "Resolution", "resolve_resolution", "check_request", "parse_mesh", "read_input_file", "request_from_record",
    "write_run_files", "default_out_dir", "TASKS", "GENERATION_TASKS", "UNDERSTANDING_TASKS", "EDIT_TASKS",
    "NEEDS_VIT", "NEEDS_VAE", "RESOLUTION_PRESETS", "DEFAULT_RESOLUTION", "DEFAULT_SIZE", "DEFAULT_FRAMES",
]
