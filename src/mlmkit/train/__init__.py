"""Training: the run folder and its lock (`runfolder`, `runlock`, `rundir`), prepared steps
(`steps`), the step and the loop's parts (`loop`), checkpoints and exact resume (`checkpoint`),
pre-emption, trackers and metrics (`tracking`), evaluation and the fill-mask check."""
