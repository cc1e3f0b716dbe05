"""The model: checks of a model source before anything heavy (`checks`), loading and the training
module (`loading`), the packed paths of architectures whose own attention cannot isolate packed
examples (`packed`, on mlmkit's attention function: `attention`), the start-up isolation probe
(`probe`) and FLOP counting (`flops`)."""
