"""The batch: which tokens are MLM targets (`masking`), how examples lie in rows (`layout`: padded
or packed, boundaries, positions), and the collator that builds both (`collator`)."""
