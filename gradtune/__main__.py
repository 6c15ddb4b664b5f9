from gradtune.cli import main

raise SystemExit(main())
