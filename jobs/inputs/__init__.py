"""The input side: listing sources, reading and decoding images, reading annotation files and weights."""
