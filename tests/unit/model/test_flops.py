"""Model FLOPs (mlmkit.model.flops): the coefficients from the model's own layers, and the peak table."""

from __future__ import annotations

import pytest
from helpers import TINY, tiny_model

from mlmkit.model.flops import FlopCounter, peak_tflops


def test_bert_counts_encoder_attention_and_head_by_hand():
    vocab = 100
    h, layers, ffn = TINY["hidden_size"], TINY["num_hidden_layers"], TINY["intermediate_size"]
    model = tiny_model("bert", vocab)
    c = FlopCounter.for_model(model)
    per_layer = 4 * h * h + 2 * h * ffn  # Q, K, V, output; FFN in and out
    assert c.encoder_per_token == 6 * layers * per_layer
    assert c.head_per_prediction == 6 * (h * h + h * vocab)  # transform + tied decoder
    assert c.attention_per_square == 12 * layers * h
    # two examples of 3 and 5 tokens, 2 predicted positions
    sparse = c.step_flops([3, 5], predicted=2, sparse_head=True)
    assert sparse == c.encoder_per_token * 8 + c.head_per_prediction * 2 + \
        c.attention_per_square * (9 + 25)
    full = c.step_flops([3, 5], predicted=2, sparse_head=False)
    assert full - sparse == c.head_per_prediction * 6  # the full head runs on all 8 real tokens


def test_packing_does_not_change_the_count_but_attention_grows_with_length():
    model = tiny_model("roberta", 100, pad_token_id=1, num_hidden_layers=1)
    c = FlopCounter.for_model(model)
    assert c.encoder_per_token > 0 and c.head_per_prediction > 0
    # one example of 8 tokens attends over 64 pairs, two of 4 over 32: same tokens, less attention
    assert c.step_flops([8], 2, True) - c.step_flops([4, 4], 2, True) == \
        pytest.approx(c.attention_per_square * 32)


def test_peak_table_picks_the_specific_name_and_the_precision():
    assert peak_tflops("NVIDIA H100 80GB HBM3", True) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", True) == 756.0
    assert peak_tflops("NVIDIA H200", False) == 67.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", True) == 312.0
    assert peak_tflops("NVIDIA H200 NVL", True) == 835.0
    assert peak_tflops("NVIDIA GH200 480GB", True) == 989.0
    assert peak_tflops("NVIDIA L40", True) == 181.0 and peak_tflops("NVIDIA L4", True) == 121.0
    assert peak_tflops("NVIDIA A10G", True) is None  # not an A10: no MFU rather than a wrong one
    assert peak_tflops("NVIDIA GeForce GTX 1080", True) is None
    assert peak_tflops(None, True) is None
