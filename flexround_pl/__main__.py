import sys

# A first line before the heavy imports (torch, Lightning, transformers take seconds, more on a busy
# machine): the user sees at once that the command started. Not for --help / --print_config output.
if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "test", "compare") and not (
    {"-h", "--help"} & set(sys.argv) or any(a.startswith("--print_config") for a in sys.argv)
):
    print(f"flexround_pl {sys.argv[1]}: starting (importing torch, Lightning, transformers)", flush=True)

from flexround_pl.cli import main  # noqa: E402

sys.exit(main())
