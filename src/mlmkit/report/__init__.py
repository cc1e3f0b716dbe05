"""The ablation report: runs read back (`runs`), statistics (`stats`), tables and plots
(`render`), assembled by `build` (``python -m mlmkit.report <ablation folder>``)."""
