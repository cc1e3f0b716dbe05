"""The padding ablation: `recipes/ablate.py` with recipes/configs/ablation_padding.yaml as its
default config; every flag of recipes/ablate.py works the same here.

    python recipes/ablate_padding.py                      # the padding ablation (4 arms x 5 seeds)
    python recipes/ablate_padding.py --config recipes/configs/ablation_scratch_bert.yaml --dry_run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import main  # noqa: E402  (recipes/ablate.py, beside this file)

if __name__ == "__main__":
    sys.exit(main(default_config="recipes/configs/ablation_padding.yaml",
                  prog="recipes/ablate_padding.py"))
