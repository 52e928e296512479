"""Old import path of :mod:`pykvm.vm.dirty` (bitmap helpers, ``DirtyRing``); kept for one release."""

from .vm.dirty import DirtyPages, DirtyRing, bitmap_to_pages, bitmap_words, pages_to_bitmap

__all__ = ["DirtyPages", "DirtyRing", "bitmap_to_pages", "bitmap_words", "pages_to_bitmap"]
