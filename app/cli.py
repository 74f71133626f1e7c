"""`mmserve`: serve, caption, ask, quantize, train-demo, keys, audit, canary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from app.settings import BUNDLED_MODEL, Settings

SAMPLE_REQUEST = Path(__file__).resolve().parent.parent / "demo" / "samples" / "caption_request.json"


def _fail(message: str) -> int:
    print(f"mmserve: error: {message}", file=sys.stderr)
    return 2


def _load_one(settings: Settings):
    """The one model `caption` and `ask` use: --model DIR (or the bundled one), as a OneShot."""
    from app.models.families import load_family_model
    from app.models.oneshot import OneShot
    from llm.hardware import resolve_dtype
    from llm.loading.errors import ModelDirError

    try:
        return OneShot(load_family_model(settings.model, max_context=settings.max_model_len or None,
                                         dtype=resolve_dtype(settings.dtype)))
    except (ModelDirError, ValueError) as e:
        raise SystemExit(_fail(str(e))) from None


def _read_image(path: str, settings: Settings):
    from vision.intake import ImageError, load_image

    try:
        return load_image(Path(path).read_bytes(), settings.intake_limits), None
    except FileNotFoundError:
        return None, f"{path}: no such file"
    except IsADirectoryError:
        return None, f"{path}: is a directory"
    except ImageError as e:
        return None, f"{path}: {e}"


def require_ray() -> str | None:
    """None when Ray Serve and Ray Data import; else the one line that says how to get them."""
    try:
        import ray  # noqa: F401
        from ray import data, serve  # noqa: F401
    except ImportError as e:
        return f"--ray needs Ray ({e.name or e}): pip install 'mmserve[ray]'"
    return None


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {text!r}")
    return int(low), int(high)


def cmd_serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    if (missing := require_ray()) is not None:
        return _fail(missing)
    from app.scale.ray_serve import Topology, run

    try:
        topology = Topology(replicas=1 if args.replicas is None else args.replicas,
                            autoscale=parse_autoscale(args.autoscale))
        settings.model_entries()  # a bad --model is a one-line error here, not a replica that dies at start
        run(settings, topology, address=args.ray_address or "")
    except ValueError as e:
        return _fail(str(e))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.lifecycle import serve
    from app.server import create_app

    from app.models.entry import ModelEntryError
    from app.server import load_models
    from llm.loading.errors import ModelDirError

    settings = Settings.from_env(host=args.host, port=args.port, models=tuple(args.model or ()) or None,
                                 models_file=args.models, canary=tuple(args.canary or ()) or None,
                                 quantize=args.quantize)
    if args.ray:
        return cmd_serve_ray(args, settings)
    if args.replicas is not None or args.autoscale is not None or args.ray_address is not None:
        return _fail("--replicas, --autoscale and --ray-address go with --ray")
    try:
        models = load_models(settings)
        app = create_app(settings, models)
    except (ModelDirError, ModelEntryError) as e:
        return _fail(str(e))
    url = f"http://{settings.host}:{settings.port}"
    registry = app.state.registry
    names = ", ".join(f"{m.name!r} ({m.family}, version {m.version})" for m in registry)
    names += "".join(f"; canary {name}@{m.version}" for name, m in registry.canaries.items())
    print(f"mmserve: serving {names} at {url}" + (f"; model {registry.routed_alias!r} routes between them"
                                                 if len(registry.models) > 1 and registry.routed_alias else ""),
          flush=True)
    if SAMPLE_REQUEST.is_file():
        print("Caption the sample image (a ready-to-paste command):\n"
              f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d @{SAMPLE_REQUEST}",
              flush=True)
    serve(app, settings)  # SIGTERM drains: /ready fails, requests in flight finish
    return 0


def cmd_caption_folder(args: argparse.Namespace, settings: Settings) -> int:
    from app.caption_dir import CaptionJobError, caption_folder

    if len(args.images) != 1 or not Path(args.images[0]).is_dir():
        return _fail(f"--out captions one directory: mmserve caption DIR --out FILE (got {' '.join(args.images)})")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        summary = caption_folder(Path(args.images[0]), Path(args.out), lambda: _load_one(settings),
                                 settings.intake_limits, recursive=args.recursive, batch_size=args.batch_size)
    except CaptionJobError as e:
        return _fail(str(e))
    print(f"mmserve: {summary}", file=sys.stderr)
    return 0


def cmd_caption_ray(args: argparse.Namespace, settings: Settings) -> int:
    if (missing := require_ray()) is not None:
        return _fail(missing)
    if not args.out or len(args.images) != 1:
        return _fail("--ray captions one DIR or PARQUET file into --out FILE (.jsonl or .parquet)")
    if args.actors < 1 or args.batch_size < 1:
        return _fail(f"--actors and --batch-size must be at least 1, got {args.actors} and {args.batch_size}")
    import ray

    from app.caption_dir import CaptionJobError
    from app.scale.local_ray import start_ray
    from app.scale.ray_caption import caption_on_ray

    start_ray(args.ray_address or "")
    try:
        summary = caption_on_ray(Path(args.images[0]), Path(args.out), settings, actors=args.actors,
                                 batch_size=args.batch_size, recursive=args.recursive)
    except CaptionJobError as e:
        return _fail(str(e))
    finally:
        ray.shutdown()
    print(f"mmserve: {summary}", file=sys.stderr)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    settings = Settings.from_env(model=args.model)
    if args.ray:
        return cmd_caption_ray(args, settings)
    if args.out:
        return cmd_caption_folder(args, settings)
    model = _load_one(settings)
    failed = 0
    for path in args.images:
        image, error = _read_image(path, settings)
        if error:
            failed += 1
            print(f"mmserve: error: {error}", file=sys.stderr)
            continue
        text = model.caption([image])[0]
        print(json.dumps({"image": path, "caption": text}) if args.json else f"{path}: {text}", flush=True)
    return 1 if failed else 0


def cmd_ask(args: argparse.Namespace) -> int:
    settings = Settings.from_env(model=args.model)
    model = _load_one(settings)
    image, error = _read_image(args.image, settings)
    if error:
        return _fail(error)
    try:
        answer = model.answer(image, args.question)
    except ValueError as e:
        return _fail(str(e))
    print(json.dumps({"image": args.image, "question": args.question, "answer": answer}) if args.json else answer)
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from demo.train import TrainCfg, train

    try:
        cfg = TrainCfg(out=Path(args.out), steps=args.steps, seed=args.seed, lr=args.lr, images=args.images,
                       init=Path(args.init) if args.init else None, reduce_share=args.reduce_share,
                       decoder_only=args.decoder_only, freeze=tuple(p for p in args.freeze.split(",") if p),
                       warmup=args.warmup, threads=args.threads, mixer_layers=args.mixer_layers)
    except ValueError as e:
        return _fail(str(e))
    result = train(cfg)
    print(f"mmserve: trained in {result['minutes']:.1f} min; checkpoint in {result['out']}")
    return 0


def _key_store():
    from app.tenancy.keys import KeyStore

    return KeyStore(Settings.from_env().keys_db_path)


def cmd_keys_add(args: argparse.Namespace) -> int:
    from app.tenancy.keys import default_limits, parse_limits, parse_scopes

    try:
        limits = {}
        for item in args.limit or ():
            name, _, value = item.partition("=")
            limits[name.strip()] = int(value)
        scopes = parse_scopes(args.scopes)
        key, info = _key_store().add(args.tenant, scopes, args.model or None,
                                     parse_limits(limits, default_limits(Settings.from_env())), args.name)
    except ValueError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps({"key": key, "id": info.id, "tenant": info.tenant, "scopes": info.scopes}))
    else:
        print(f"{key}\nid {info.id}, tenant {info.tenant!r}, scopes {','.join(info.scopes)} "
              "(the key is shown only now; the store keeps its SHA-256)", flush=True)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    infos = _key_store().list(args.tenant)
    if args.json:
        print(json.dumps([dataclasses.asdict(info) for info in infos]))
        return 0
    for info in infos:
        state = f"revoked at {info.revoked_at}" if info.revoked_at else "live"
        models = ",".join(info.models) if info.models is not None else "*"
        limits = ",".join(f"{k}={v}" for k, v in info.limits.items() if v) or "default"
        print(f"{info.id}  tenant={info.tenant}  scopes={','.join(info.scopes)}  models={models}  "
              f"limits={limits}  {state}  {info.name}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    info = _key_store().revoke(args.key_id)
    if info is None:
        return _fail(f"no key with id {args.key_id!r}")
    print(f"{info.id} revoked (tenant {info.tenant!r}): refused from its next request on, in every worker")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from app.tenancy.audit import verify

    path = Path(args.file)
    if not path.is_file():
        return _fail(f"{path}: no such file")
    result = verify(path, rotated=not args.no_rotated)
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems:
        print(f"FAIL: {problem}")
    files = ", ".join(p.name for p in result.files)
    print(f"{'ok' if result.ok else 'TAMPERED'}: {result.records} records in {len(result.files)} file(s) ({files}); "
          f"last hash {result.last_hash}")
    return 0 if result.ok else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from app.models.compress import Compression, compress_checkpoint
    from llm.loading.errors import ModelDirError
    from llm.quant import QuantScheme
    from llm.quant.prune import PruneSpec
    from llm.quant.scheme import DEFAULT_INT4_GROUP_SIZE

    try:  # every argument checked here, before anything loads
        group = args.group_size if args.group_size is not None or args.weights != "int4" else DEFAULT_INT4_GROUP_SIZE
        scheme = QuantScheme(args.weights, group, args.method) if args.weights else None
        if not args.weights and (args.group_size is not None or args.method != "rtn"):
            raise ValueError("--group-size and --method need --weights int8|int4")
        compression = Compression(scheme, PruneSpec.parse(args.prune) if args.prune else None)
        report = compress_checkpoint(args.in_dir, args.out_dir, compression, args.calibration,
                                     progress=lambda items, **kw: tqdm(items, mininterval=1, leave=False, **kw))
    except (ModelDirError, ValueError) as e:
        return _fail(str(e))
    print(f"mmserve: {args.out_dir}: {report.family} decoder {report.record.label}, weights read per token "
          f"{report.bytes_before / 2**20:.1f} -> {report.bytes_after / 2**20:.1f} MiB"
          + (f", calibrated on {report.calibration_sequences} sequences" if report.calibration_sequences else "")
          + f"; serve it with: mmserve serve --model NAME={args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description="Multimodal (image + text) inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"model directory (default: $MMSERVE_MODEL or the bundled demo model, {BUNDLED_MODEL})"

    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--model", action="append", metavar="NAME=DIR",
                       help="a model to serve, NAME=DIR, NAME@VERSION=DIR or DIR (repeat for several; the same NAME "
                            "with two versions: the second is the canary; default: $MMSERVE_MODEL or "
                            f"the bundled demo model, {BUNDLED_MODEL})")
    serve.add_argument("--canary", action="append", metavar="NAME@VERSION=WEIGHT",
                       help="the canary's starting share (NAME@VERSION=0.1, or NAME@VERSION=shadow:0.5 for shadow "
                            "copies); default 0: set it later with `mmserve canary set`")
    serve.add_argument("--models", default=None, metavar="FILE",
                       help="a models.toml: one [[model]] table per model (name, path, family, dtype, "
                            "visual_tokens, version, aliases, memory_share, quantize)")
    serve.add_argument("--quantize", default=None, metavar="int8|int4|int4-gN",
                       help="quantize each model's decoder on load (round-to-nearest; an entry's own quantize wins)")
    serve.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: the same app as replicas (pip install 'mmserve[ray]')")
    serve.add_argument("--replicas", type=int, default=None, help="with --ray: how many replicas (default 1)")
    serve.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="with --ray: scale between MIN and MAX replicas on requests in flight")
    serve.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="with --ray: join this Ray cluster (default: start one on this machine)")
    serve.set_defaults(func=cmd_serve)

    caption = sub.add_parser("caption", help="caption image files, or a folder into a JSONL file (--out)")
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or one DIR with --out")
    caption.add_argument("--json", action="store_true", help='one {"image", "caption"} object per line')
    caption.add_argument("--out", default=None, metavar="FILE",
                         help='caption every image in DIR into FILE, one {"image", "caption" | "error"} line per '
                              'image (paths relative to DIR); rerun to resume where it stopped')
    caption.add_argument("-r", "--recursive", action="store_true", help="with --out: include subfolders")
    caption.add_argument("--batch-size", type=int, default=16, help="with --out: images per model call")
    caption.add_argument("--model", default=None, help=model_help)
    caption.add_argument("--ray", action="store_true",
                         help="with --out: run on Ray Data (DIR or a PARQUET of path,image; pip install 'mmserve[ray]')")
    caption.add_argument("--actors", type=int, default=1, help="with --ray: captioning actors (each loads the model)")
    caption.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="with --ray: join this Ray cluster (default: start one on this machine)")
    caption.set_defaults(func=cmd_caption)

    ask = sub.add_parser("ask", help="ask a question about an image")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--json", action="store_true", help='print {"image", "question", "answer"}')
    ask.add_argument("--model", default=None, help=model_help)
    ask.set_defaults(func=cmd_ask)

    quantize = sub.add_parser("quantize", help="write a quantized and/or pruned copy of a checkpoint directory")
    quantize.add_argument("in_dir", metavar="IN_DIR", help="a checkpoint directory (demo/CoCa or Hugging Face Mllama)")
    quantize.add_argument("out_dir", metavar="OUT_DIR", help="where the new checkpoint goes (new or empty)")
    quantize.add_argument("--weights", default=None, metavar="int8|int4",
                          help="int8: W8A16, per output channel; int4: W4A16, per group (bf16 activations)")
    quantize.add_argument("--group-size", type=int, default=None, metavar="32|64|128",
                          help="int4 inputs per scale and zero (default 64)")
    quantize.add_argument("--method", default="rtn", metavar="rtn|gptq",
                          help="round-to-nearest, or GPTQ (needs --calibration)")
    quantize.add_argument("--prune", default=None, metavar="heads=SHARE,mlp=SHARE",
                          help="drop that share of each layer's attention heads and MLP channels, least important "
                               "first (needs --calibration)")
    quantize.add_argument("--calibration", default=None, metavar="DIR",
                          help="images (and an optional prompts.txt, one prompt a line) to measure importance "
                               "and GPTQ statistics on")
    quantize.set_defaults(func=cmd_quantize)

    train = sub.add_parser("train-demo", help="train the bundled demo model (README: the recipe)")
    train.add_argument("--out", default=str(BUNDLED_MODEL))
    train.add_argument("--steps", type=int, default=6000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--warmup", type=int, default=200, help="linear warm-up steps before the cosine decay")
    train.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a crowded machine)")
    train.add_argument("--images", type=int, default=48_000, help="pre-rendered training images")
    train.add_argument("--init", default=None, metavar="DIR", help="fine-tune this checkpoint")
    train.add_argument("--reduce-share", type=float, default=0.0,
                       help="share of batches trained on reduced visual tokens (1/2, 1/4, 1/8; keep and tome)")
    train.add_argument("--decoder-only", action="store_true",
                       help="train only the multimodal decoder (zero-shot towers unchanged)")
    train.add_argument("--mixer-layers", type=int, default=None,
                       help="transformer blocks over the vision tower's tokens (default: 1 from scratch, the "
                            "checkpoint's own with --init; one that has fewer grows them, starting as the identity)")
    train.add_argument("--freeze", default="", metavar="PARTS",
                       help="comma-separated parts left as they are: cnn (the tower's conv stages, features "
                            "computed once per image), text (the text tower)")
    train.set_defaults(func=cmd_train_demo)
    keys = sub.add_parser("keys", help="API keys in the key store (setting keys_db)").add_subparsers(
        dest="keys_command", required=True)
    add = keys.add_parser("add", help="make a key (printed once; the store keeps only its hash)")
    add.add_argument("--tenant", required=True, help="who the key belongs to: files, batches and cache are per tenant")
    add.add_argument("--scopes", default="chat,embeddings,batches",
                     help="comma-separated of chat, embeddings, batches, admin (default: chat,embeddings,batches)")
    add.add_argument("--model", action="append", metavar="NAME", help="a model the key may use (repeat; default: all)")
    add.add_argument("--limit", action="append", metavar="NAME=N",
                     help="a quota of its own, e.g. tokens_per_day=100000 (repeat; default: the server's settings)")
    add.add_argument("--name", default="", help="a note for people")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_keys_add)
    listing = keys.add_parser("list", help="every key (never the key itself)")
    listing.add_argument("--tenant", default=None)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id: refused at once by every worker")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(func=cmd_keys_revoke)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check the hash chain of an audit log (and its rotated files)")
    verify.add_argument("file", metavar="FILE", help="the audit log (its rotated FILE.000001... are read too)")
    verify.add_argument("--no-rotated", action="store_true", help="check FILE alone")
    verify.set_defaults(func=cmd_audit_verify)
    from app.canary.cli import add_canary_parser

    add_canary_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # settings from the environment
        return _fail(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
