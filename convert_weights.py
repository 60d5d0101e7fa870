"""Convert Lance weights between the released PyTorch layout and a lance-jax orbax checkpoint.

  python convert_weights.py to-jax   --src DOWNLOADS_OR_GOLDEN_DIR --out CKPT [--dtype keep|float32|bfloat16]
  python convert_weights.py to-torch --src CKPT --out DIR
  python convert_weights.py inspect  DIR
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    to_jax = sub.add_parser("to-jax", help="reference folders -> one orbax checkpoint")
    to_jax.add_argument("--src", help="downloads root (Lance_3B*/, Qwen2.5-VL-ViT/, Wan2.2_VAE.pth) or golden layout "
                                      "(model/, vit/, vae/)")
    to_jax.add_argument("--model", help="Lance model folder (overrides --src)")
    to_jax.add_argument("--vit", help="Qwen2.5-VL-ViT folder (overrides --src)")
    to_jax.add_argument("--vae", help="Wan 2.2 VAE .pth or .safetensors (overrides --src)")
    to_jax.add_argument("--vit-source", choices=["standalone", "bundled"], default="standalone",
                        help="which ViT weights win when the model file also bundles vit_model.* (default standalone)")
    to_jax.add_argument("--tie-lm-head", action="store_true",
                        help="if the checkpoint has no lm_head, use the embedding (the release ships an untied one)")
    to_torch = sub.add_parser("to-torch", help="orbax checkpoint -> the reference layout")
    to_torch.add_argument("--src", required=True, help="a checkpoint written by to-jax")
    for cmd in (to_jax, to_torch):
        cmd.add_argument("--out", required=True)
        cmd.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep")
        cmd.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        cmd.add_argument("--no-progress", action="store_true")
    inspect = sub.add_parser("inspect", help="keys, shapes, dtypes, parameter counts per component")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="full listing as JSON")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, NotImplementedError) as err:
        print(f"convert_weights.py {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from lance_jax.convert import converter
    from lance_jax.convert.sources import find_reference

    if args.command == "to-jax":
        if not (args.src or args.model):
            raise SystemExit("to-jax needs --src or --model")
        paths = find_reference(args.src, model=args.model, vit=args.vit, vae=args.vae)
        manifest = converter.to_jax(paths, args.out, dtype=args.dtype, vit_source=args.vit_source,
                                    tie_lm_head=args.tie_lm_head, overwrite=args.overwrite,
                                    progress=not args.no_progress)
        print(f"wrote {args.out}: items {', '.join(manifest['items'])}")
    elif args.command == "to-torch":
        written = converter.to_torch(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                     progress=not args.no_progress)
        print(f"wrote {args.out}: {', '.join(written)}")
    else:
        info = converter.describe(args.path)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            print(info["format"])
            for name, comp in info["components"].items():
                print(f"  {name:<16} {comp['tensors']:>6} tensors {comp['parameters']:>15,} params  "
                      f"{'/'.join(comp['dtypes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
