"""Thin command-line entry points. Each ``main(argv) -> int`` parses options, calls one library
function and returns an exit code; tests call them in-process. Nothing imports this package."""
