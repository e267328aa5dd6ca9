from bnfold.cli import main

raise SystemExit(main())
