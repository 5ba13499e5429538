"""Which code built every stage of this run: each output's ``_STAGE`` marker
records its fingerprint, whose ``code`` is ``schemas.fingerprint.code_digest``
of the stage's entry module. This counts the outputs per stage and digest
and names the entry module whose digest *in the checkout on PYTHONPATH*
equals it (``-`` for none).

    PYTHONPATH=<checkout of the run's commit> python provenance.py OUTPUT_DIR
"""

import collections
import json
import os
import sys

from schemas.fingerprint import code_digest

ENTRIES = ("adaptive_transfer.real_data.build", "adaptive_transfer.experiment.runner",
           "adaptive_transfer.demo_data", "beam_pipelines.importance_weights", "beam_pipelines.near_duplicates",
           "spark_jobs.write_shards", "spark_jobs.resample", "spark_jobs.build_index", "trainer.pretrain",
           "trainer.evaluate", "trainer.finetune")


def main(root: str) -> int:
    here = {}
    for entry in ENTRIES:
        try:
            here[code_digest(entry)] = entry
        except (ValueError, ImportError):
            continue
    seen = collections.Counter()
    for path, dirs, files in os.walk(root):
        if "_STAGE" in files:
            with open(os.path.join(path, "_STAGE")) as f:
                marker = json.load(f)
            code = marker.get("fingerprint", {}).get("settings", {}).get("code", "")
            seen[(marker["stage"], code, "_SUCCESS" in files)] += 1
    print("| Stage | Outputs | Finished | Code digest | Equals the checkout's digest of |")
    print("|---|---:|---:|---|---|")
    for (stage, code, done), n in sorted(seen.items()):
        print(f"| {stage} | {n} | {'yes' if done else 'no'} | `{code[:12]}` | {here.get(code, '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
