from extauth.cli import main

raise SystemExit(main())
