"""A real face pipeline: image -> face detection -> 128-d dlib embedding -> enrol / verify.

Who it is for: a developer connecting a real face model to the store, who wants to see
where the model ends and the store begins, and which threshold to start from.

It needs the optional extra ``faces`` (dlib's detector and its ResNet face descriptor;
the model weights ship inside ``face_recognition_models``, so nothing is downloaded at
run time)::

    pip install 'biotemplate[faces]'             # dlib-bin, face_recognition_models, pillow
    pip install --no-deps face_recognition       # its own dlib pin would compile from source

Run it on images you pass (one face per image; the subject id is given before ``=``)::

    python examples/face_model_dlib.py --enrol alice=alice1.jpg --enrol bob=bob1.jpg \\
        --probe alice2.jpg --claim alice          # 1:1: is this alice?
    python examples/face_model_dlib.py --enrol alice=alice1.jpg --enrol bob=bob1.jpg \\
        --probe someone.jpg                       # 1:N, open set: who is it, if anyone?
    python examples/face_model_dlib.py --self-check   # loads the models, runs on a blank image

**The threshold: 0.92 cosine similarity** (``THRESHOLD`` below). Thresholds belong to a
model, not to the store. dlib's descriptor is trained so that two images of one person lie
close together (dlib states its rule as a Euclidean distance below 0.6, 99.38% on LFW);
measured as cosine similarity, which is what the store compares, its scores are crowded
near 1: in the measurement behind issue 11, every impostor pair scored above 0.73, so the
0.55-0.60 thresholds of the README's synthetic demo would accept every stranger. 0.92 is
where that measurement put the cut. It is a starting point, not a guarantee: measure the
genuine and impostor scores of your cameras and your population and choose the threshold
for the false-match rate you can accept (docs/developers.md, "Thresholds").

The pipeline in brief: ``face_recognition.face_locations`` finds faces with dlib's HOG
detector; ``face_encodings`` aligns each face on 5 landmarks and runs the ResNet, giving
a 128-d float64 vector; the store takes it as float32, normalises it and compares by
cosine. An image with no face or several is refused here, before the store: the store
cannot tell a bad crop from a person.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import biotemplate as bt

THRESHOLD = 0.92  # cosine, dlib's 128-d descriptor: calibrate for your data (see above)
DIM = 128
MODEL = "dlib-resnet-v1-128"
MISSING = ("face_model_dlib.py needs the 'faces' extra: pip install 'biotemplate[faces]' "
           "and pip install --no-deps face_recognition")


def load_models() -> Any:
    """The face_recognition module (dlib underneath), or exit with one line saying what
    to install."""
    try:
        import face_recognition
        import PIL  # noqa: F401 (face_recognition reads images with it)
    except ImportError:
        print(MISSING, file=sys.stderr)
        raise SystemExit(1) from None
    return face_recognition


def embed(fr: Any, image: np.ndarray[Any, Any], where: str) -> np.ndarray[Any, Any]:
    """One 128-d descriptor for the one face in ``image`` (RGB, uint8)."""
    boxes = fr.face_locations(image, number_of_times_to_upsample=1, model="hog")
    if len(boxes) != 1:
        raise ValueError(f"{where}: found {len(boxes)} faces; one face per image, please")
    (vector,) = fr.face_encodings(image, known_face_locations=boxes, num_jitters=1)
    return np.asarray(vector, dtype=np.float32)


def self_check(fr: Any) -> None:
    from PIL import Image
    blank = np.asarray(Image.new("RGB", (160, 160), (128, 128, 128)))
    faces = fr.face_locations(blank)
    print(f"self-check: dlib and the face models load; a blank image has {len(faces)} "
          f"faces (0 expected); threshold {THRESHOLD} for {MODEL}")


def run(fr: Any, work: Path, enrol: list[tuple[str, str]], probe: str,
        claim: str | None) -> None:
    policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"demo": {
        "description": "faces from the command line, kept for one day",
        "max_retention": "1d", "default_retention": "1d",
        "modes": ["verification", "identification"], "match_threshold": THRESHOLD}}})
    keys = bt.FileKeyProvider.generate(work / "master.key")
    with bt.TemplateStore.create(work / "faces", dim=DIM, model=MODEL, policy=policy,
                                 key_provider=keys) as store:
        for subject, path in enrol:
            vector = embed(fr, fr.load_image_file(path), path)
            store.enroll(vector, subject_id=subject, purposes=["demo"], actor="cli-user")
            print(f"enrolled {subject} from {path}")
        vector = embed(fr, fr.load_image_file(probe), probe)
        if claim is not None:
            v = store.verify(vector, subject_id=claim, purpose="demo", actor="cli-user")
            print(f"1:1 {probe} as {claim}: match={v.match} (cosine {v.score:.3f}, "
                  f"threshold {v.threshold})")
        else:
            res = store.search(vector, purpose="demo", actor="cli-user")
            if not res.candidates:
                print(f"1:N {probe}: nobody enrolled scored {THRESHOLD} or more (open set)")
            for c in res.candidates:
                print(f"1:N {probe}: {c.subject_id} (cosine {c.score:.3f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="enrol and match faces from image files "
                                                 "with dlib's 128-d model")
    parser.add_argument("--enrol", action="append", default=[], metavar="ID=IMAGE",
                        help="enrol the face in IMAGE as subject ID (repeat)")
    parser.add_argument("--probe", metavar="IMAGE", help="the image to match")
    parser.add_argument("--claim", metavar="ID", help="verify the probe as this subject (1:1)")
    parser.add_argument("--self-check", action="store_true",
                        help="load the models and run on a blank image")
    args = parser.parse_args(argv)
    fr = load_models()
    if args.self_check:
        self_check(fr)
        return
    pairs = [item.split("=", 1) for item in args.enrol]
    if not pairs or not args.probe or any(len(p) != 2 or not all(p) for p in pairs):
        parser.error("give --enrol ID=IMAGE (one or more) and --probe IMAGE")
    work = Path(tempfile.mkdtemp(prefix="biotemplate-dlib-"))
    try:
        run(fr, work, [(p[0], p[1]) for p in pairs], args.probe, args.claim)
    except (ValueError, OSError, bt.BiotemplateError) as exc:  # no face, bad image, ...
        print(f"face_model_dlib.py: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
