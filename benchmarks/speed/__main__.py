import sys

if sys.argv[1:2] == ["engines"]:
    from benchmarks.speed.engines import main
    sys.exit(main(sys.argv[2:]))
from benchmarks.speed.suite import main

main()
