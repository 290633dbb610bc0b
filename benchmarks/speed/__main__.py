import sys

if sys.argv[1:2] == ["engines"]:
    from benchmarks.speed.engines import main
    sys.exit(main(sys.argv[2:]))
if sys.argv[1:2] == ["codecs"]:  # float codecs side by side on real chunks (issue 21)
    from benchmarks.speed.codecs import main
    sys.exit(main(sys.argv[2:]))
if sys.argv[1:2] == ["masks"]:   # pack's mask arithmetic, implementations side by side (issue 21)
    from benchmarks.speed.masks import main
    sys.exit(main(sys.argv[2:]))
from benchmarks.speed.suite import main

main()
