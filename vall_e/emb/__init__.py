"""Tokenizers: text -> phones (g2p) and audio <-> EnCodec codes (qnt)."""
