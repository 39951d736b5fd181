from binsight.cli import main

raise SystemExit(main())
