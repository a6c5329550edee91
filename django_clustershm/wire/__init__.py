"""The wire: frames and opcodes (:mod:`.frames`), the handshake (:mod:`.handshake`),
the limits told at the handshake (:mod:`.limits`), and what an argument may be
(:mod:`.args`), checked on both sides.

Nothing here imports the client side, the Manager, Django or gunicorn.
"""
