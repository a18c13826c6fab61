"""`marginface data synth|inspect|convert|align|get-detector`."""
from __future__ import annotations

from marginface.cli.options import add_detector_options, print_json, problem_lines
from marginface.errors import UserError
from marginface.io.progress import Progress

# deferred: startup time. Each command imports the data module it runs.


def register(sub) -> None:
    d = sub.add_parser("data", help="make, inspect and convert datasets")
    dsub = d.add_command_group("data_command")
    s = dsub.add_parser("synth", help="write synthetic identities to disk")
    s.add_argument("out", help="output directory")
    s.add_argument("--identities", type=int, default=100, help="number of identities")
    s.add_argument("--images", type=int, default=10, help="images per identity")
    s.add_argument("--size", type=int, default=112, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    s.add_argument("--format", choices=["folder", "rec"], default="folder", help="image folder or insightface RecordIO")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=run_synth)
    i = dsub.add_parser("inspect", help="summarise a training source or a verification set")
    i.add_argument("path", help="training source (folder, list, .rec, synthetic) or verification set "
                                "(.bin, LFW directory, pairs .csv)")
    i.add_argument("--json", action="store_true", help="print the result as one JSON object")
    i.set_defaults(func=run_inspect)
    c = dsub.add_parser("convert", help="folder/list -> RecordIO pack; RecordIO -> folder; .bin -> images + pairs.csv")
    c.add_argument("src", help="dataset to read")
    c.add_argument("dst", help="dataset to write (its format follows from SRC)")
    c.add_argument("--size", type=int, help="resize images to SIZE x SIZE")
    c.add_argument("--json", action="store_true", help="print the result as one JSON object")
    c.set_defaults(func=run_convert)
    a = dsub.add_parser("align", help="detect and align every photo under SRC into 112x112 crops under DST")
    a.add_argument("src", help="folder of photos (any depth)")
    a.add_argument("dst", help="folder for the aligned crops (same relative paths)")
    add_detector_options(a)
    a.add_argument("--size", type=int, default=112, help="crop side in pixels")
    a.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a.set_defaults(func=run_align)
    g = dsub.add_parser("get-detector", help="download the MTCNN weights (facenet-pytorch wheel via pip) into a cache")
    g.add_argument("--cache-dir", help="where to put the weights (default: ~/.cache/marginface/mtcnn)")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g.set_defaults(func=run_get_detector)


def run_synth(args) -> int:
    from marginface.data.synthetic import write_synthetic

    info = write_synthetic(args.out, identities=args.identities, images_per_identity=args.images,
                           image_size=args.size, seed=args.seed, fmt=args.format)
    if args.json:
        print_json(info)
    else:
        print(f"wrote {info['images']} images of {info['identities']} identities to {info['path']} ({info['format']})")
    return 0


def run_inspect(args) -> int:
    from marginface.data.tools import inspect_path

    info = inspect_path(args.path)
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            if k != "warnings":  # already said on stderr when inspected
                print(f"{k}: {v}")
    return 0


def run_convert(args) -> int:
    from marginface.data.tools import convert, format_convert_summary

    info = convert(args.src, args.dst, image_size=args.size)
    print_json(info) if args.json else print(format_convert_summary(args.src, info))
    return 0


def run_align(args) -> int:
    from marginface.data.detect import build_detector
    from marginface.data.tools import align_folder

    detector = build_detector(args.detector, weights=args.detector_weights)
    with Progress("aligning", None, unit="images", enabled=not args.json) as bar:
        info = align_folder(args.src, args.dst, detector, size=args.size, progress=bar)
    if not info["aligned"]:  # nothing was written: the problems are the error
        problems = [f"{len(info[k])} {k.replace('_', ' ')}" for k in ("no_face", "unreadable") if info[k]]
        first = (info["no_face"] + info["unreadable"])[:3]
        raise UserError(f"{args.src}: no face aligned in {info['images']} image(s) ({', '.join(problems)}: "
                        f"{', '.join(first)}{', ...' if sum(map(len, (info['no_face'], info['unreadable']))) > 3 else ''})")
    if args.json:
        print_json(info)
    else:
        print(f"aligned {info['aligned']} of {info['images']} images into {args.dst}")
        for key, title in (("no_face", "no face found (not written)"), ("unreadable", "unreadable (not written)"),
                           ("multiple_faces", "several faces (the largest was aligned)")):
            for line in problem_lines(title, info[key]):
                print(line)
    return 0


def run_get_detector(args) -> int:
    from marginface.data.detect.weights import fetch_mtcnn_weights

    path = fetch_mtcnn_weights(args.cache_dir)
    print_json({"path": str(path)}) if args.json else print(f"MTCNN weights ready in {path}")
    return 0
