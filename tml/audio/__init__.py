"""Audio front end: WAV I/O and the dMel tokenizer."""

from tml.audio.dmel import DMelConfig, DMelError, DMelTokenizer
from tml.audio.wav import AudioFormatError, decode_wav, encode_wav, read_wav, write_wav

__all__ = ["AudioFormatError", "DMelConfig", "DMelError", "DMelTokenizer", "decode_wav", "encode_wav", "read_wav",
           "write_wav"]
