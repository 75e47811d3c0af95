"""espeak-ng speech synthesis through ctypes, with word timings from espeak's own word events: the real speech of
the synthetic data sets (``data_prep``) and of the evaluation's canned replies (``tml.eval.evaluate.canned_reply``).

The library and its voice data come from the pip package ``espeakng_loader`` (no root, no network). espeak-ng
keeps global state, so the library is loaded and initialised once per process and every call holds a lock.

    wave, words = speak("hello there, how are you", voice="en-us", rate=170, pitch=50)
    # wave: float32 [samples] at 16 kHz; words: [Word("hello", 0.0, 0.31), Word("there,", 0.31, 0.62), ...]
"""

from __future__ import annotations

import ctypes
import math
import threading
import zlib
from dataclasses import dataclass

import torch
import torchaudio.functional as AF

from tml.streams.episode import Word

# espeak_AUDIO_OUTPUT / espeak_EVENT_TYPE / espeak_PARAMETER / flags, from espeak-ng's speak_lib.h.
AUDIO_OUTPUT_SYNCHRONOUS = 2
EVENT_LIST_TERMINATED, EVENT_WORD, EVENT_SENTENCE, EVENT_END, EVENT_MSG_TERMINATED = 0, 1, 2, 5, 6
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4
POS_CHARACTER = 1
CHARS_UTF8 = 1
INITIALIZE_DONT_EXIT = 0x8000  # on a fatal error, return instead of calling exit()

# RMS of a 10 ms frame below which it counts as a pause (espeak writes exact zeros between words; speech
# frames are ~0.01-0.3).
_SILENCE_RMS = 1e-3


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded, initialised, or could not speak; the message names the step."""


class _Event(ctypes.Structure):
    """``espeak_EVENT`` (speak_lib.h). ``audio_position`` is in ms from the start of this synthesis."""

    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character index of the word in the input text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _Id),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Engine:
    """The process-wide espeak-ng instance: loaded and initialised once, used under a lock."""

    _instance: "_Engine | None" = None
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:
            raise EspeakError("the pip package 'espeakng-loader' is missing; `pip install espeakng-loader`") from e
        lib_path, data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise EspeakError(f"cannot load espeak-ng library {lib_path}: {e}") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        sr = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), INITIALIZE_DONT_EXIT)
        if sr <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {sr}) with voice data at {data_path}")
        self.lib, self.sample_rate = lib, sr
        # espeak-ng seeds its own noise generator (pitch jitter, frication) with time() at initialisation and also
        # calls libc rand(). Reseeding both before every call makes speech a pure function of (text, voice, rate,
        # pitch), so generated data sets are byte-identical across runs. espeak_ng_SetRandSeed is 1.52+.
        self.libc = ctypes.CDLL(None)
        self.libc.srand.argtypes = [ctypes.c_uint]
        self.set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self.set_seed is not None:
            self.set_seed.argtypes, self.set_seed.restype = [ctypes.c_long], None
        self.lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._events: list[tuple[int, int, int]] = []  # (type, text_position, audio_position ms)
        # Keep a reference to the C callback: if it were garbage-collected espeak would call freed memory.
        self._callback = _Callback(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> "_Engine":
        with cls._create_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        i = 0
        while events and events[i].type != EVENT_LIST_TERMINATED:
            e = events[i]
            self._events.append((e.type, e.text_position, e.audio_position))
            i += 1
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """text -> (int16 wave [samples] at ``self.sample_rate``, [(text_position, audio_ms)] of word events)."""
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise EspeakError(f"espeak-ng has no voice {voice!r}; try 'en-us', 'en' (British), 'en+f3', "
                                  f"'en-us+m3', 'en-029'")
            self.lib.espeak_SetParameter(PARAM_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
            self._chunks, self._events = [], []
            seed = zlib.crc32(f"{text}|{voice}|{rate}|{pitch}".encode())
            self.libc.srand(seed)
            if self.set_seed is not None:
                self.set_seed(seed)
            buf = ctypes.create_string_buffer(text.encode("utf-8"))
            err = self.lib.espeak_Synth(buf, len(buf), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
            if err != 0:
                raise EspeakError(f"espeak_Synth failed with error {err} for text {text[:60]!r}")
            pcm = b"".join(self._chunks)
            events = [(pos, ms) for typ, pos, ms in self._events if typ == EVENT_WORD]
        wave = torch.frombuffer(bytearray(pcm), dtype=torch.int16) if pcm else torch.zeros(0, dtype=torch.int16)
        return wave, events


@dataclass
class EspeakVoice:
    """One espeak-ng voice with its speaking rate (words per minute, espeak default 175) and pitch (0-100)."""

    name: str = "en-us"
    rate: int = 170
    pitch: int = 50

    def speak(self, text: str, sample_rate: int = 16000) -> tuple[torch.Tensor, list[Word]]:
        return speak(text, self.name, self.rate, self.pitch, sample_rate)


def _word_spans(text: str) -> list[tuple[int, int, str]]:
    """Whitespace-separated words of ``text`` as (char start, char end, word)."""
    spans, i = [], 0
    for w in text.split():
        i = text.index(w, i)
        spans.append((i, i + len(w), w))
        i += len(w)
    return spans


def speak(text: str, voice: str = "en-us", rate: int = 170, pitch: int = 50,
          sample_rate: int = 16000) -> tuple[torch.Tensor, list[Word]]:
    """Speak ``text`` with espeak-ng.

    Returns (float32 wave ``[samples]`` in [-1, 1] at ``sample_rate``, one ``Word`` per whitespace-separated word of
    ``text`` with start/end in seconds from the start of the wave). A word spans from its espeak word event to
    the next word's event, shrunk to the voiced (non-silent) 10 ms frames inside, so pauses lie between words.
    """
    spans = _word_spans(text)
    if not spans:
        raise ValueError("speak() needs non-empty text")
    eng = _Engine.get()
    pcm, events = eng.synth(text, voice, rate, pitch)
    if pcm.numel() == 0:
        raise EspeakError(f"espeak-ng produced no audio for {text[:60]!r} with voice {voice!r}")
    wave = pcm.to(torch.float32) / 32768.0
    if sample_rate != eng.sample_rate:
        wave = AF.resample(wave, eng.sample_rate, sample_rate)
    duration = wave.numel() / sample_rate
    hop = max(1, sample_rate // 100)  # 10 ms energy frames: espeak's pauses are digital zeros
    rms = wave[: wave.numel() // hop * hop].view(-1, hop).pow(2).mean(1).sqrt()
    voiced = (rms > _SILENCE_RMS).tolist()

    # Map each word event (1-based char position) to the input word containing it; a word split by espeak
    # into several events (e.g. "3.5" -> three, point, five) keeps the first.
    starts: list[float | None] = [None] * len(spans)
    for pos, ms in events:
        c = pos - 1
        for k, (a, b, _) in enumerate(spans):
            if a <= c < b or (c < a and (k == 0 or c >= spans[k - 1][1])):
                if starts[k] is None:
                    starts[k] = ms / 1000.0
                break
    # A word espeak gave no event for (rare: pure punctuation) starts where the previous one does.
    for k in range(len(starts)):
        if starts[k] is None:
            starts[k] = starts[k - 1] if k else 0.0
    words = []
    for k, (_, _, w) in enumerate(spans):
        s = min(starts[k], duration)
        e = starts[k + 1] if k + 1 < len(spans) else duration
        # Shrink [s, e) to its voiced frames, so pauses (after commas, sentence ends) fall between words.
        fa, fb = int(s * 100), min(math.ceil(e * 100), len(voiced))
        on = [f for f in range(fa, fb) if voiced[f]]
        if on:
            s, e = max(s, on[0] / 100), min(e, (on[-1] + 1) / 100)
        words.append(Word(w, round(s, 4), round(max(e, s), 4)))
    return wave, words
