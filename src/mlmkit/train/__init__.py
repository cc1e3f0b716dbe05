"""Training: the run folder and its lock (`runfolder`, `runlock`, `rundir`), the prepared steps and
their one assembly (`steps`), the optimizer and schedule (`optim`), the step and the run's steps
(`loop`), what is logged (`metrics`), the sync checks (`sync`), checkpoints and exact resume
(`checkpoint`), the launch (`launch`), pre-emption, trackers (`tracking`), evaluation and the
fill-mask check."""
