"""Micromanipulators: one interface, move handles, limits and speed policy, drivers."""

from manipulators.base import Limits, Manipulator, MoveHandle, MoveState, stop_all

__all__ = ["Limits", "Manipulator", "MoveHandle", "MoveState", "stop_all"]
