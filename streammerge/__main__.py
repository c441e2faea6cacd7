from streammerge.cli import main

raise SystemExit(main())
