"""Cython hot paths. Built by setup.py; there is no pure-Python fallback unless an issue asks for one."""
