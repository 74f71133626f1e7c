"""The decoder side: tokenizers, prompt formats, the cross-attention decoder and generation."""
