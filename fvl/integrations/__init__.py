"""Adapters that let other tools run fvl models. ``lmms_eval``: lmms-eval's ``--model fvl`` (extra
``fvl[lmms-eval]``). Nothing here is imported by fvl itself: each adapter imports its tool."""
