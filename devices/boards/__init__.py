"""Simulated boards: firmware behind a pseudo-terminal, for testing the bench path
(pyserial, bench files, power control) without hardware.

``python -m devices.boards.simulator --pty`` starts one board (see :mod:`.simulator`);
the firmware it runs is :mod:`.firmware`.
"""
