"""`marginface verify` (two photos or a pairs CSV) and `marginface gallery enroll|search|list|remove|convert`."""
from __future__ import annotations

import argparse
from pathlib import Path

from marginface.cli import options
from marginface.cli.options import (add_face_model_options, add_json, apply_threads, check_positive, note,
                                    print_json, problem_lines)
from marginface.errors import UserError
from marginface.io.progress import Progress

# deferred: startup time. The deployment stack is imported when a command runs; the face embedder is
# made by `options.face_embedder` (looked up on use, so tests can replace it).


def register(sub) -> None:
    v = sub.add_parser("verify", help="same person? two photos, or every pair of a pairs CSV")
    v.add_argument("images", nargs="*", metavar="IMAGE", help="A.jpg B.jpg")
    v.add_argument("--pairs", help="CSV with file_x,file_y[,Decision|same]; paths relative to the CSV")
    v.add_argument("--face-a", type=int, metavar="N", help="which face of A (0 = the largest; default: the largest)")
    v.add_argument("--face-b", type=int, metavar="N", help="which face of B (0 = the largest; default: the largest)")
    add_face_model_options(v)
    v.set_defaults(func=run_verify)

    f = sub.add_parser("identify-folder", help="name the people in a folder of photos (known/ unknown/)",
                       description="One line per photo of UNKNOWN: file,identity,similarity; 'unknown' below the "
                                   "threshold, 'no_face' for a photo without a face.")
    f.add_argument("known", help="folder of identity folders (KNOWN/<name>/*.jpg, enrolled in memory) or a "
                                 "gallery file (.sqlite, .db, or a legacy .npz) enrolled with the same model")
    f.add_argument("unknown", help="folder of photos to identify")
    f.add_argument("--recursive", action="store_true", help="also photos in sub-folders of UNKNOWN")
    f.add_argument("--top", type=int, default=1, help="matches kept per photo (in --json)")
    add_face_model_options(f)
    f.set_defaults(func=run_identify_folder)

    fc = sub.add_parser("faces", help="every face of a photo: box, 5 landmarks, detector score (--json: embeddings too)")
    fc.add_argument("image", help="photo")
    add_face_model_options(fc, threshold_help=argparse.SUPPRESS)  # finding faces compares nothing
    fc.set_defaults(func=run_faces)

    g = sub.add_parser("gallery", help="enrol identities and search faces (1:N)")
    gsub = g.add_command_group("gallery_command")
    en = gsub.add_parser("enroll", help="add DIR/<identity>/*.jpg to a gallery (.sqlite/.db; created when missing)")
    en.add_argument("dir", help="DIR/<identity>/*.jpg: one folder of photos per identity")
    en.add_argument("--db", required=True, help="gallery file: .sqlite or .db (SQLite, safe to share between "
                                                "processes); .npz galleries are read-only, see `gallery convert`")
    en.add_argument("--replace", action="store_true",
                    help="replace the enrolled images of the identities in DIR (default: add to them)")
    en.add_argument("--skip-no-face", action="store_true",
                    help="skip images without a face or that cannot be read, and list them all at the end, instead "
                         "of failing at the first (it fails only when no image was usable)")
    add_face_model_options(en, threshold_help=argparse.SUPPRESS)  # enrolment compares nothing (deprecated)
    en.set_defaults(func=run_gallery_enroll)
    se = gsub.add_parser("search", help="the closest enrolled identities of the largest face in IMAGE")
    se.add_argument("image", help="photo to search (its largest face)")
    se.add_argument("--db", required=True, help="gallery file (.sqlite, .db, or a legacy .npz)")
    se.add_argument("--top", type=int, default=5, help="how many identities to return")
    se.add_argument("--index", choices=["auto", "exact", "faiss"], default="auto",
                    help="search method; auto: FAISS when installed and the gallery is large, else exact")
    add_face_model_options(se)
    se.set_defaults(func=run_gallery_search)
    ls = gsub.add_parser("list", help="enrolled identities and their image counts")
    ls.add_argument("--db", required=True, help="gallery file (.sqlite, .db, or a legacy .npz)")
    add_json(ls)
    ls.set_defaults(func=run_gallery_list)
    rm = gsub.add_parser("remove", help="delete identities (all their images) from a gallery")
    rm.add_argument("names", nargs="+", metavar="NAME", help="identities to delete")
    rm.add_argument("--db", required=True, help="gallery file (.sqlite or .db)")
    add_json(rm)
    rm.set_defaults(func=run_gallery_remove)
    cv = gsub.add_parser("convert", help="copy a legacy .npz gallery into a new .sqlite gallery")
    cv.add_argument("src", help="the .npz gallery")
    cv.add_argument("dst", help="the new .sqlite/.db file (must not exist)")
    add_json(cv)
    cv.set_defaults(func=run_gallery_convert)


def run_verify(args) -> int:
    from marginface.deploy.verify import verify_images, verify_pair_list

    if args.pairs and args.images:
        raise UserError("verify: give either two images or --pairs PAIRS.csv, not both")
    if not args.pairs and len(args.images) != 2:
        raise UserError(f"verify: expected two images (A.jpg B.jpg) or --pairs PAIRS.csv, got {len(args.images)} image(s)")
    fe = options.face_embedder(args)
    if fe.threshold_source == "default":  # said after the work, so an error stays the only stderr line
        defaulted = (f"the model carries no verification threshold; used the default {fe.threshold} "
                     f"(pass --threshold to set one)")
    else:
        defaulted = ""
    if args.pairs and (args.face_a is not None or args.face_b is not None):
        raise UserError("verify: --face-a/--face-b pick a face of two images; --pairs uses each photo's largest")
    if args.pairs:
        with Progress("finding faces", None, unit="photos", enabled=not args.json) as bar:
            result = verify_pair_list(fe, args.pairs, progress=bar)
        if defaulted:
            note(defaulted)
        if args.json:
            print_json(result)
        else:
            for row in result["pairs"]:
                print(f"{row['similarity']:+.4f}  {'same' if row['same'] else 'different':9s}  {row['a']}  {row['b']}")
            if result["eval"]:
                m = result["eval"]
                print(f"{len(result['pairs'])} pairs: accuracy {m['accuracy']:.4f} ± {m['accuracy_std']:.4f}, "
                      f"AUC {m['auc']:.4f}, EER {m['eer']:.4f}, best threshold {m['threshold']:.3f}")
        return 0
    result = verify_images(fe, *args.images, face_a=_face(args.face_a, "--face-a"),
                           face_b=_face(args.face_b, "--face-b"))
    if defaulted:
        note(defaulted)
    if args.json:
        print_json(result)
    else:
        print(f"similarity {result['similarity']:.4f} -> {'same person' if result['same'] else 'different people'} "
              f"(threshold {result['threshold']:.3f}, {result['threshold_source']})")
    return 0


def _face(index, flag: str):
    """``--face-a/--face-b N`` -> the face index for `verify_images` (None: the largest)."""
    if index is None:
        return "largest"
    if index < 0:
        raise UserError(f"{flag} must be >= 0 (0 = the largest face), got {index}")
    return index


def run_identify_folder(args) -> int:
    from marginface.deploy.gallery import format_identify_rows, identify_folder

    check_positive("--top", args.top)
    fe = options.face_embedder(args)
    result = identify_folder(args.known, args.unknown, model=fe, threshold=args.threshold, top_k=args.top,
                             recursive=args.recursive)
    if args.json:
        print_json(result)
    else:
        text = format_identify_rows(result)
        if text:
            print(text)
        for item in result["skipped"]:
            note(f"skipped {item['file']}: {item['reason']}")
    return 0


def run_faces(args) -> int:
    from marginface.deploy.api import faces

    apply_threads(args.threads)
    found = faces(args.image, model=options.face_embedder(args))
    if args.json:
        print_json({"image": str(args.image), "faces": found})
    else:
        for f in found:
            box = ", ".join(f"{v:.1f}" for v in f["box"])
            marks = " ".join(f"({x:.1f}, {y:.1f})" for x, y in f["landmarks"])
            print(f"face {f['face']}: box [{box}] score {f['score']:.3f} landmarks {marks}")
        print(f"{len(found)} face(s) in {args.image}")
    return 0


def run_gallery_enroll(args) -> int:
    from marginface.deploy.gallery import check_enroll_target, enroll_store

    check_enroll_target(args.db, args.dir)  # before the model loads
    fe = options.face_embedder(args)
    identities = sum(1 for p in Path(args.dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    with Progress("enrolling", identities, unit="identities", enabled=not args.json) as bar:
        report = enroll_store(fe, args.dir, args.db, replace=args.replace, skip_no_face=args.skip_no_face,
                              progress=lambda name, faces: bar.update())
    if args.json:
        print_json(report)
    else:
        print(f"enrolled {report['identities']} identities ({report['added']} new images, "
              f"{report['already_enrolled']} already enrolled{', replaced' if args.replace else ''}) into "
              f"{args.db}; it holds {report['gallery_identities']} identities")
        for line in problem_lines("skipped (no face or unreadable; the other images were enrolled)",
                                  [f"{item['file']}: {item['reason']}" for item in report["skipped"]]):
            print(line)
    if args.threshold is not None:  # said after the work, so an error stays the only stderr line
        note("gallery enroll --threshold is deprecated and ignored: enrolment compares no faces "
             "(give --threshold to `gallery search` or `verify`)")
    return 0


def run_gallery_search(args) -> int:
    from marginface.deploy.gallery import UNKNOWN, open_gallery, search_face

    check_positive("--top", args.top)
    gallery = open_gallery(args.db)
    fe = options.face_embedder(args)
    gallery.check_model(*fe.fingerprint(), where=str(args.db), embedder=fe)
    result = search_face(fe, gallery, args.image, top_k=args.top, threshold=args.threshold, index=args.index)
    if args.json:
        print_json(result)
    else:
        for rank, m in enumerate(result["matches"], 1):
            print(f"{rank:2d}. {m['identity']:30s} {m['similarity']:+.4f}")
        print(f"-> {result['identity'] if result['known'] else UNKNOWN} (threshold {result['threshold']:.3f})")
    return 0


def run_gallery_list(args) -> int:
    from marginface.deploy.gallery import open_gallery

    gallery = open_gallery(args.db)
    rows = gallery.list()
    if args.json:
        print_json({"db": str(args.db), "identities": len(rows), "images": sum(r["images"] for r in rows),
                    "entries": rows})
    else:
        for r in rows:
            print(f"{r['identity']:30s} {r['images']:6d}")
        print(f"{len(rows)} identities, {sum(r['images'] for r in rows)} images in {args.db}")
    return 0


def run_gallery_remove(args) -> int:
    from marginface.deploy.gallery_store import GalleryStore

    if Path(args.db).suffix.lower() == ".npz":
        raise UserError(f"{args.db}: .npz galleries are read-only (legacy); convert it with "
                        f"`marginface gallery convert {args.db} {Path(args.db).with_suffix('.sqlite')}`")
    with GalleryStore(args.db) as store:
        report = store.remove(args.names)
        report.update(db=str(args.db), gallery_identities=len(store))
    if args.json:
        print_json(report)
    else:
        print(f"removed {', '.join(report['removed'])} ({report['image_rows']} image rows) from {args.db}; "
              f"it holds {report['gallery_identities']} identities")
    return 0


def run_gallery_convert(args) -> int:
    from marginface.deploy.gallery_store import convert_npz

    report = convert_npz(args.src, args.dst)
    if args.json:
        print_json(report)
    else:
        print(f"converted {report['identities']} identities ({report['images']} images) from {args.src} to {args.dst}")
    return 0
