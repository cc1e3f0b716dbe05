"""``python -m mlmkit.report <ablation folder>``: the report (`mlmkit.report.build`)."""

import sys

from mlmkit.report.build import main

sys.exit(main())
