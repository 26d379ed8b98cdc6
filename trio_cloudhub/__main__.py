from trio_cloudhub.cli import main

raise SystemExit(main())
