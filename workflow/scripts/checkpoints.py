"""Keep only the resume checkpoints that belong to this train job; set the others aside.

The train rule (Snakemake) and stage (DVC) always run `ssr train --resume`, so that a
job killed at its time limit, or a failed one, continues from the checkpoint of each
run when the runner retries it. But the runners also re-run train when its params or
inputs changed, and then an old checkpoint must not be continued: `ssr train --resume`
refuses one written under other params (an error, by design), and one written from
other input files (a re-prepared dataset, new superpixels, another demo CLIP) it cannot
tell apart at all.

So before training, for every run and seed of the dataset, this writes
`results/{ds}/{run}/seed{S}/resume.json`: the run's training identity
(`ssr.config.training_identity`, seed included) and the size and modification time of
every input file of the train stage. A checkpoint is left for `--resume` only when the
record written before it is the same; otherwise it is renamed to
`checkpoint.stale.pt` (one generation kept, so a mistaken edit can be undone by hand)
and the run starts over. Every decision is printed (to the rule's log).

    python workflow/scripts/checkpoints.py --dataset demo --params params.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402

from ssr.config import identity_differences, load_params, training_identity  # noqa: E402

RECORD = "resume.json"
CHECKPOINT = "checkpoint.pt"
STALE = "checkpoint.stale.pt"


def input_stats(paths: list[str]) -> dict[str, list[int] | None]:
    """file -> [size, mtime_ns] (None if missing). Folders are left out: prepare writes
    image_labels.json after them, so that file stands for a (re)prepared dataset."""
    out = {}
    for p in paths:
        if os.path.isdir(p):
            continue
        try:
            st = os.stat(p)
            out[p] = [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            out[p] = None
    return out


def record_for(params, dataset: str, run: str, seed: int, inputs: dict) -> dict:
    return {"identity": {**training_identity(params.for_run(dataset, run), dataset), "seed": seed}, "inputs": inputs}


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two records, in words."""
    found = identity_differences(old.get("identity", {}), new["identity"])
    old_inputs = old.get("inputs", {})
    found += [f"input {p} changed" for p in sorted(set(old_inputs) | set(new["inputs"]))
              if old_inputs.get(p) != new["inputs"].get(p)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=pipeline.DATASETS)
    parser.add_argument("--params", default=pipeline.PARAMS)
    args = parser.parse_args(argv)

    raw, resources = pipeline.load(args.params, site=True)  # the folders this machine's runs use
    params = load_params(args.params)
    train = next(s for s in pipeline.dataset_stages(raw, resources, args.dataset) if s.rule == "train")
    inputs = input_stats(train.input_paths)
    for run in pipeline.runs(raw, args.dataset):
        for seed in pipeline.seeds(raw, args.dataset):
            folder = Path(pipeline.run_dir(raw, args.dataset, run, seed))
            new = record_for(params, args.dataset, run, seed, inputs)
            checkpoint, record = folder / CHECKPOINT, folder / RECORD
            if checkpoint.exists():
                old = json.loads(record.read_text()) if record.exists() else None
                why = ["no record of what it was trained from"] if old is None else changes(old, new)
                if why:
                    os.replace(checkpoint, folder / STALE)
                    print(f"{checkpoint}: set aside as {STALE}, the run starts over ({'; '.join(why)})")
                else:
                    print(f"{checkpoint}: same params and inputs, `ssr train --resume` continues it")
            folder.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(new, indent=1, default=str) + "\n")
            os.replace(tmp, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
